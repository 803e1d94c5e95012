// A channel reaches SUBSCRIBED, heartbeats are answered, and a removed
// channel is CLOSED by the server's phx_close.
import { client, env, waitForStatus, done, fail } from './lib.mjs'

const heartbeats = []
let onOk
const heartbeatOk = new Promise((resolve) => (onOk = resolve))
const supabase = client(env('ANON_KEY'), {
  heartbeatIntervalMs: 300,
  timeout: 5000,
  heartbeatCallback: (status) => {
    heartbeats.push(status)
    if (status === 'ok') onOk()
  },
})

const channel = supabase.channel('room1', { config: { broadcast: { self: true } } })
const seen = []
const status = await waitForStatus(channel, ['SUBSCRIBED', 'CHANNEL_ERROR', 'TIMED_OUT'], 8000, seen)
if (status !== 'SUBSCRIBED') fail(`expected SUBSCRIBED, saw ${JSON.stringify(seen)}`)

await Promise.race([
  heartbeatOk,
  new Promise((_, reject) => setTimeout(() => reject(new Error(`no heartbeat ok; saw ${heartbeats}`)), 5000)),
])

const removed = await supabase.removeChannel(channel)
if (removed !== 'ok') fail(`removeChannel returned ${removed}`)
await supabase.removeAllChannels()
supabase.realtime.disconnect()
done({ status, heartbeats, seen })
