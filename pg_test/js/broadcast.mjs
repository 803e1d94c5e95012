// Broadcast between three supabase-js clients on one public channel: `a`
// (vsn 2.0.0, self off), `b` (vsn 2.0.0, self on) and `c` (vsn 1.0.0).
// `a` sends JSON, binary and an oversized payload, all acked; then `b` and
// `c` send, and `b` sends "end", the sentinel every client waits for: what
// each received before it is the whole story. Prints one JSON line.
import { client, env, fail, done, subscribeAll, conditions } from './lib.mjs'

const key = env('ANON_KEY')
const big = Number(env('BIG_BYTES'))
const result = {}
const timer = setTimeout(() => fail(`timed out: ${JSON.stringify(result)}`), 20000)
const got = { a: [], b: [], c: [] }
const { changed, until } = conditions()

function record(name) {
  return (m) => {
    const payload = m.payload instanceof ArrayBuffer ? { bytes: [...new Uint8Array(m.payload)] } : m.payload
    got[name].push({ event: m.event, payload })
    changed()
  }
}

function channel(sb, name, broadcast) {
  return sb.channel('room', { config: { broadcast } }).on('broadcast', { event: '*' }, record(name))
}

const a = channel(client(key), 'a', { self: false, ack: true })
const b = channel(client(key), 'b', { self: true, ack: true })
const c = channel(client(key, { vsn: '1.0.0' }), 'c', { ack: true })
await subscribeAll([a, b, c])
const send = (ch, event, payload) => ch.send({ type: 'broadcast', event, payload })
result.acks = {
  json: await send(a, 'json', { n: 1, nested: { keep: [1, 'two'] } }),
  binary: await send(a, 'binary', new Uint8Array([0, 1, 255]).buffer),
  big: await send(a, 'big', { blob: 'x'.repeat(big) }),
  from_b: await send(b, 'from_b', { n: 2 }),
  from_c: await send(c, 'from_c', { n: 3 }),
  end: await send(b, 'end', {}),
}
const ended = (name) => got[name].some((m) => m.event === 'end')
await until(() => ended('a') && ended('b') && ended('c'))
result.got = got
clearTimeout(timer)
done(result)
