// The marketplace app's realtime patterns with supabase-js: messages for a
// recipient (INSERT, then the read-status UPDATE), notifications for a user
// (mark-as-read UPDATEs), production stages of one supplier order (every
// event kind), and all order updates. Prints READY once every channel is
// SUBSCRIBED, then one line per event received:
//   EVENT <channel> <payload JSON>
// and exits once EXPECTED events have arrived.
import { client, env, fail, subscribeAll } from './lib.mjs'

const expected = Number(env('EXPECTED'))
const buyer = env('BUYER_ID')
const supplierOrder = env('SUPPLIER_ORDER_ID')
// The user's own token: row-level security decides what arrives.
const supabase = client(env('KEY'))
await supabase.realtime.setAuth(env('KEY'))

let received = 0
const log = (name) => (payload) => {
  console.log(`EVENT ${name} ${JSON.stringify(payload)}`)
  if (++received >= expected) {
    supabase.removeAllChannels().then(() => process.exit(0))
  }
}

const channels = [
  supabase.channel('inbox').on('postgres_changes',
    { event: '*', schema: 'public', table: 'messages', filter: `recipient_id=eq.${buyer}` }, log('inbox')),
  supabase.channel('notifications').on('postgres_changes',
    { event: 'UPDATE', schema: 'public', table: 'notifications', filter: `user_id=eq.${buyer}` }, log('notifications')),
  supabase.channel('stages').on('postgres_changes',
    { event: '*', schema: 'public', table: 'production_stages', filter: `supplier_order_id=eq.${supplierOrder}` }, log('stages')),
  supabase.channel('order-updates').on('postgres_changes',
    { event: '*', schema: 'public', table: 'order_updates' }, log('order-updates')),
]

const timer = setTimeout(() => fail(`only ${received} of ${expected} events within 20 s`), 20000)
await subscribeAll(channels)
console.log('READY')
timer.refresh()
