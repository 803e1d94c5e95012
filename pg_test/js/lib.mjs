// Shared helpers for the supabase-js scenarios. Each scenario reads its
// inputs from the environment, prints one JSON line with what it observed,
// and exits non-zero when an expectation fails.
import { createClient } from '@supabase/supabase-js'

export function env(name) {
  const value = process.env[name]
  if (!value) throw new Error(`missing environment variable ${name}`)
  return value
}

export function client(key, realtime = {}) {
  return createClient(env('SUPABASE_URL'), key, {
    auth: { persistSession: false, autoRefreshToken: false },
    realtime,
  })
}

/** Resolves with the first status in `wanted`; rejects after `ms`. */
export function waitForStatus(channel, wanted, ms, seen = []) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`no ${wanted.join('/')} within ${ms} ms; saw ${JSON.stringify(seen)}`)),
      ms,
    )
    channel.subscribe((status, err) => {
      seen.push(err ? `${status}: ${err.message}` : status)
      if (wanted.includes(status)) {
        clearTimeout(timer)
        resolve(status)
      }
    })
  })
}

/** Subscribes every channel; fails the scenario unless all reach SUBSCRIBED. */
export async function subscribeAll(channels) {
  await Promise.all(channels.map((ch) => new Promise((resolve, reject) => {
    ch.subscribe((status, err) => {
      if (status === 'SUBSCRIBED') resolve()
      else if (status !== 'CLOSED') reject(new Error(`${ch.topic}: ${status} ${err?.message ?? ''}`))
    })
  }))).catch((e) => fail(e.message))
}

export function fail(message) {
  console.error(message)
  process.exit(1)
}

export function done(result) {
  console.log(JSON.stringify(result))
  process.exit(0)
}

/**
 * Waiting for a condition that callbacks change: `until(pred)` resolves
 * once `pred()` holds, checked now and after every `changed()`.
 */
export function conditions() {
  const waiters = []
  return {
    changed: () => waiters.forEach((w) => w()),
    until: (pred) => new Promise((resolve) => {
      const check = () => { if (pred()) resolve() }
      waiters.push(check)
      check()
    }),
  }
}
