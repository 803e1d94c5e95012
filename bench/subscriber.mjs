// Bench subscriber: listens to one table with supabase-js and, for the
// latency run, measures receipt time minus the row's `ts` (clock_timestamp()
// at INSERT). Prints READY when subscribed; on SIGTERM or after EXPECTED
// events prints a JSON summary.
import { createClient } from '@supabase/supabase-js'

const { SUPABASE_URL, KEY, TABLE, FILTER } = process.env
const expected = Number(process.env.EXPECTED || 0)
const supabase = createClient(SUPABASE_URL, KEY, { auth: { persistSession: false } })
await supabase.realtime.setAuth(KEY)

// "2026-11-26T05:07:55.656129+00:00" -> microseconds since the epoch
function micros(ts) {
  const m = /^(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(.*)$/.exec(ts)
  const base = Date.parse(m[1] + m[3]) * 1000
  return base + Number(((m[2] || '') + '000000').slice(0, 6))
}

const latencies = []
let count = 0
function summary() {
  latencies.sort((a, b) => a - b)
  const q = (p) => latencies.length ? latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))] : null
  console.log(JSON.stringify({ events: count, p50_ms: q(0.5), p99_ms: q(0.99), max_ms: q(1) }))
  process.exit(0)
}
process.on('SIGTERM', summary)

supabase.channel('bench')
  .on('postgres_changes', { event: 'INSERT', schema: 'public', table: TABLE, ...(FILTER ? { filter: FILTER } : {}) }, (p) => {
    count++
    if (p.new.ts) {
      const now = (performance.timeOrigin + performance.now()) * 1000
      latencies.push((now - micros(p.new.ts)) / 1000)
    }
    if (expected && count >= expected) summary()
  })
  .subscribe((status, err) => {
    if (status === 'SUBSCRIBED') console.log('READY')
    else if (status !== 'CLOSED') { console.error(status, err?.message); process.exit(1) }
  })
