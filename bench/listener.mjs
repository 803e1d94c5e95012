// Bench listener: the pg_notify baseline's client. LISTENs on CHANNEL
// through node-postgres (PGHOST, PGPORT, PGUSER: the bench cluster) and
// counts notifications. Prints READY once listening; on SIGTERM prints a
// JSON summary.
import pg from 'pg'

const client = new pg.Client({ host: process.env.PGHOST, port: Number(process.env.PGPORT), user: process.env.PGUSER, database: 'postgres' })
await client.connect()
let count = 0
client.on('notification', () => { count++ })
await client.query(`LISTEN ${process.env.CHANNEL}`)
console.log('READY')
process.on('SIGTERM', () => {
  console.log(JSON.stringify({ notifications: count }))
  process.exit(0)
})
