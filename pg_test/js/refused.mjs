// With a forged or expired apikey the socket is refused: the channel reports
// a failure and never reaches SUBSCRIBED.
import { client, env, done, fail } from './lib.mjs'

// How long to keep watching after the first failure for a late SUBSCRIBED.
const WATCH_MS = 2000

const supabase = client(env('BAD_KEY'), { timeout: 1500 })
const channel = supabase.channel('room1')
const seen = []
await new Promise((resolve, reject) => {
  const cap = setTimeout(() => reject(new Error(`no failure reported: ${JSON.stringify(seen)}`)), 10000)
  channel.subscribe((status, err) => {
    seen.push(err ? `${status}: ${err.message}` : status)
    if (status === 'SUBSCRIBED') fail(`reached SUBSCRIBED with a bad key: ${JSON.stringify(seen)}`)
    if (seen.length === 1) {
      clearTimeout(cap)
      setTimeout(resolve, WATCH_MS)
    }
  })
})
supabase.realtime.disconnect()
if (seen.includes('SUBSCRIBED')) fail(`reached SUBSCRIBED with a bad key: ${JSON.stringify(seen)}`)
done({ seen })
