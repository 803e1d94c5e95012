// One supabase-js client on Node with the `ws` package as its transport
// (Node's built-in WebSocket never retries a refused connection), listening
// to INSERTs on table t. Prints, as they happen:
//   STATUS <status>        each subscribe status (SUBSCRIBED again after a restart)
//   SYSTEM <status> <msg>  each system message
//   EVENT <id>             each insert
// and exits after the event whose id is STOP_ID. KEY: the token.
import WebSocket from 'ws'
import { client, env, fail } from './lib.mjs'

const key = env('KEY')
const stop = Number(env('STOP_ID'))
setTimeout(() => fail('no stop event within 60 s'), 60000)
const supabase = client(key, { transport: WebSocket })
await supabase.realtime.setAuth(key)
supabase
  .channel('restart')
  .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 't' }, (p) => {
    console.log(`EVENT ${p.new.id}`)
    if (p.new.id === stop) process.stdout.write('', () => process.exit(0))
  })
  .on('system', {}, (p) => console.log(`SYSTEM ${p.status} ${p.message}`))
  .subscribe((status) => console.log(`STATUS ${status}`))
