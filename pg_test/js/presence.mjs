// Presence with supabase-js. A watcher follows the channel while two tabs
// share the key "alice", "bob" tracks and untracks, and a tab in a child
// process ("carol", ROLE=tab) is killed with SIGKILL: no leave, no close
// frame. Prints one JSON line: the watcher's state after each step and
// the joins and leaves it heard.
import { client, env, fail, done, subscribeAll, conditions } from './lib.mjs'
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'

const key = env('ANON_KEY')
const join = (sb, presenceKey, enabled) =>
  sb.channel('lobby', { config: { presence: { key: presenceKey, enabled } } })

if (process.env.ROLE === 'tab') {
  const ch = join(client(key), 'carol', false)
  await subscribeAll([ch])
  if ((await ch.track({ name: 'carol' })) !== 'ok') fail('carol could not track')
  console.log('TRACKED')
  await new Promise(() => {})
}

const result = { steps: {}, heard: [] }
const timer = setTimeout(() => fail(`timed out: ${JSON.stringify(result)}`), 30000)
const { changed, until } = conditions()

const watcher = join(client(key), 'watcher', true)
  .on('presence', { event: 'sync' }, changed)
  .on('presence', { event: 'join' }, ({ key: k, newPresences }) => {
    result.heard.push({ join: k, metas: newPresences.length })
    changed()
  })
  .on('presence', { event: 'leave' }, ({ key: k, leftPresences }) => {
    result.heard.push({ leave: k, metas: leftPresences.length })
    changed()
  })
const tab1 = join(client(key), 'alice', false)
const tab2 = join(client(key), 'alice', false)
const bob = join(client(key), 'bob', false)
await subscribeAll([watcher, tab1, tab2, bob])

/** The watcher's state as {key: [payload names or tabs, sorted]}. */
function state() {
  const out = {}
  for (const [k, metas] of Object.entries(watcher.presenceState())) {
    out[k] = metas.map((m) => m.tab ?? m.name).sort()
  }
  return out
}
const has = (k, n) => (state()[k] ?? []).length === n

result.acks = [await tab1.track({ tab: 1 }), await tab2.track({ tab: 2 }), await bob.track({ name: 'bob' })]
await until(() => has('alice', 2) && has('bob', 1))
result.steps.tracked = state()

result.acks.push(await bob.untrack())
await until(() => has('bob', 0))
result.steps.bob_untracked = state()

const tab = spawn(process.execPath, [fileURLToPath(import.meta.url)], {
  env: { ...process.env, ROLE: 'tab' },
  stdio: ['ignore', 'pipe', 'inherit'],
})
await new Promise((resolve) => tab.stdout.on('data', (d) => { if (String(d).includes('TRACKED')) resolve() }))
await until(() => has('carol', 1))
tab.kill('SIGKILL')
await until(() => has('carol', 0))
result.steps.carol_killed = state()

await tab1.unsubscribe()
await until(() => has('alice', 1))
result.steps.tab1_left = state()
clearTimeout(timer)
done(result)
