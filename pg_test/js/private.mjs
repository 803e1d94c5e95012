// A private order channel with supabase-js: the buyer and the supplier of
// an order join it and exchange a broadcast; an outsider is refused. Then,
// after READY, the harness deletes the supplier's assignment and writes GO
// on stdin: the supplier refreshes its token and must lose the channel.
// Prints one JSON line with what it observed.
import { client, env, fail } from './lib.mjs'
import { createInterface } from 'node:readline'

const topic = env('TOPIC')
const result = {}
const timer = setTimeout(() => fail(`timed out: ${JSON.stringify(result)}`), 20000)

/** Joins `topic` privately; resolves with {sb, ch, status, seen, system}. */
async function join(key, onNote) {
  const sb = client(key)
  await sb.realtime.setAuth(key)
  const ch = sb.channel(topic, { config: { private: true, broadcast: { ack: true } } })
  const joined = { sb, ch, seen: [], system: [], waiters: [] }
  ch.on('broadcast', { event: 'note' }, (m) => onNote?.(m.payload))
  ch.on('system', {}, (p) => { joined.system.push(p); joined.waiters.forEach((w) => w()) })
  joined.status = await new Promise((resolve) => {
    ch.subscribe((status, err) => {
      joined.seen.push(err ? `${status}: ${err.message}` : status)
      joined.waiters.forEach((w) => w())
      if (['SUBSCRIBED', 'CHANNEL_ERROR', 'TIMED_OUT'].includes(status)) resolve(status)
    })
  })
  return joined
}

/** Resolves once `pred()` holds (re-checked on every status or system message). */
function until(joined, pred) {
  return new Promise((resolve) => {
    const check = () => { if (pred()) resolve() }
    joined.waiters.push(check)
    check()
  })
}

let noteReceived
const note = new Promise((resolve) => { noteReceived = resolve })
const buyer = await join(env('BUYER_KEY'), noteReceived)
const supplier = await join(env('SUPPLIER_KEY'))
const outsider = await join(env('OUTSIDER_KEY'))
result.status = { buyer: buyer.status, supplier: supplier.status, outsider: outsider.status }
result.outsider_seen = outsider.seen
if (supplier.status === 'SUBSCRIBED') {
  result.ack = await supplier.ch.send({ type: 'broadcast', event: 'note', payload: { text: 'kiln fired' } })
  result.buyer_got = await note
}
console.log('READY')
const stdin = createInterface({ input: process.stdin })
for await (const line of stdin) {
  if (line === 'GO') break
}
await supplier.sb.realtime.setAuth(env('SUPPLIER_KEY2'))
await until(supplier, () => supplier.system.length > 0 && supplier.seen.includes('CLOSED'))
result.after_refresh = { system: supplier.system, seen: supplier.seen }
clearTimeout(timer)
process.stdout.write(`${JSON.stringify(result)}\n`, () => process.exit(0))
