// Broadcast replay with supabase-js: a private channel joins with
// `broadcast.replay: {since, limit: 2}` and gets the database's newest two
// messages, marked replayed, and prints JOINED; after GO on stdin (the
// harness has sent one more from the database meanwhile) it waits for that
// live one, leaves, joins again and gets the newest two again. Prints one
// JSON line with what each round heard.
import { client, env, fail, done, subscribeAll, conditions } from './lib.mjs'
import { createInterface } from 'node:readline'

const user = env('USER_KEY')
const since = Number(env('SINCE'))
const result = { first: [], rejoined: [] }
const timer = setTimeout(() => fail(`timed out: ${JSON.stringify(result)}`), 20000)
const { changed, until } = conditions()

const sb = client(user)
await sb.realtime.setAuth(user)
function join(round) {
  return sb.channel('replayroom', { config: { private: true, broadcast: { replay: { since, limit: 2 } } } })
    .on('broadcast', { event: 'note' }, (m) => {
      result[round].push({ payload: m.payload, meta: m.meta })
      changed()
    })
}
const first = join('first')
await subscribeAll([first])
await until(() => result.first.length >= 2)
console.log('JOINED')
for await (const line of createInterface({ input: process.stdin })) {
  if (line === 'GO') break
}
await until(() => result.first.length >= 3)
await sb.removeChannel(first)
const again = join('rejoined')
await subscribeAll([again])
await until(() => result.rejoined.length >= 2)
clearTimeout(timer)
done(result)
