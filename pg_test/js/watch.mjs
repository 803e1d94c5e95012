// Several users of the marketplace, each with its own supabase-js client and
// one channel listening to every change of TABLES, unfiltered: row-level
// security alone decides what each receives. USERS is a JSON object
// {name: token}. Prints READY once every channel is SUBSCRIBED, then
//   EVENT <user> <table> <eventType> <payload JSON>
// per event. A user is done when a notification titled "fence" reaches it
// (the scenario writes one per user last: events arrive in commit order, so
// nothing for that user can still be on its way); once all are, exits.
import { client, env, fail, subscribeAll } from './lib.mjs'

const users = JSON.parse(env('USERS'))
const tables = env('TABLES').split(',')
const pending = new Set(Object.keys(users))
const timer = setTimeout(() => fail(`no fence within 20 s for ${[...pending].join(', ')}`), 20000)

const channels = []
for (const [name, key] of Object.entries(users)) {
  const supabase = client(key)
  await supabase.realtime.setAuth(key)
  let channel = supabase.channel(`watch-${name}`)
  for (const table of tables) {
    channel = channel.on('postgres_changes', { event: '*', schema: 'public', table }, (p) => {
      if (p.table === 'notifications' && p.new?.title === 'fence') {
        pending.delete(name)
        // exit once stdout is flushed (a pipe is written asynchronously)
        if (pending.size === 0) process.stdout.write('', () => process.exit(0))
        return
      }
      console.log(`EVENT ${name} ${p.table} ${p.eventType} ${JSON.stringify(p)}`)
    })
  }
  channels.push(channel)
}
await subscribeAll(channels)
console.log('READY')
timer.refresh()
