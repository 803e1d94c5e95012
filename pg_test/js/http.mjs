// HTTP broadcast with supabase-js: `send()` on a channel that is not
// joined falls back to POST /api/broadcast, `httpSend()` uses the
// per-event endpoint (JSON and bytes, public and private). A listener on
// each topic records what arrives until the sentinel "end"; a client with
// a forged key must be refused. Prints one JSON line.
import { client, env, fail, done, subscribeAll, conditions } from './lib.mjs'

const user = env('USER_KEY')
const forged = env('FORGED_KEY')
const result = { got: { room: [], writable: [] } }
const timer = setTimeout(() => fail(`timed out: ${JSON.stringify(result)}`), 20000)
const { changed, until } = conditions()
const record = (name) => (m) => {
  const payload = m.payload instanceof ArrayBuffer ? { bytes: [...new Uint8Array(m.payload)] } : m.payload
  result.got[name].push({ event: m.event, payload })
  changed()
}

const listenerClient = client(user)
await listenerClient.realtime.setAuth(user)
const room = listenerClient.channel('room').on('broadcast', { event: '*' }, record('room'))
const writable = listenerClient.channel('writable', { config: { private: true } })
  .on('broadcast', { event: '*' }, record('writable'))
await subscribeAll([room, writable])

// never subscribed: these go over HTTP
const sender = client(user)
await sender.realtime.setAuth(user)
const publicChannel = sender.channel('room')
const privateChannel = sender.channel('writable', { config: { private: true } })
const lockedChannel = sender.channel('locked', { config: { private: true } })
const outcome = async (p) => p.then((r) => r.success ?? r, (e) => `rejected: ${e.message}`)
const quiet = console.warn
console.warn = () => {} // (supabase-js warns about the fallback)
result.sends = {
  fallback: await publicChannel.send({ type: 'broadcast', event: 'fallback', payload: { n: 1 } }),
  http_json: await outcome(publicChannel.httpSend('http_json', { n: 2 })),
  http_bytes: await outcome(publicChannel.httpSend('http_bytes', new Uint8Array([7, 8]).buffer)),
  private_ok: await outcome(privateChannel.httpSend('private_ok', { n: 3 })),
  private_locked: await outcome(lockedChannel.httpSend('private_locked', { n: 4 })),
}
const intruder = client(forged)
const intruderChannel = intruder.channel('room')
result.forged = {
  fallback: await intruderChannel.send({ type: 'broadcast', event: 'forged', payload: {} }),
  http: await outcome(intruderChannel.httpSend('forged', {})),
}
console.warn = quiet
result.sends.end = await outcome(publicChannel.httpSend('end', {}))
result.sends.end_private = await outcome(privateChannel.httpSend('end', {}))
const ended = (name) => result.got[name].some((m) => m.event === 'end')
await until(() => ended('room') && ended('writable'))
clearTimeout(timer)
done(result)
