-- pg_realtime's demo schema: the example sourcing marketplace (buyers, suppliers,
-- admins; messages, notifications, production stages, order updates) with its
-- row-level security, after ../shared/seed-app/schema.sql. `make run` loads it,
-- then seed.sql.

create extension if not exists pgcrypto;

create schema if not exists auth;

create or replace function auth.jwt() returns jsonb
language sql stable as $$
  select coalesce(nullif(current_setting('request.jwt.claims', true), ''), '{}')::jsonb
$$;

create or replace function auth.uid() returns uuid
language sql stable as $$
  select nullif(auth.jwt() ->> 'sub', '')::uuid
$$;

create or replace function auth.role() returns text
language sql stable as $$
  select coalesce(auth.jwt() ->> 'role', 'anon')
$$;

do $$ begin
  if not exists (select from pg_roles where rolname = 'anon') then create role anon nologin; end if;
  if not exists (select from pg_roles where rolname = 'authenticated') then create role authenticated nologin; end if;
  if not exists (select from pg_roles where rolname = 'service_role') then create role service_role nologin bypassrls; end if;
  -- the role whose grants decide which roles a token may act as
  -- (pg_realtime.authenticator), as PostgREST's authenticator
  if not exists (select from pg_roles where rolname = 'authenticator') then create role authenticator noinherit login; end if;
end $$;
grant anon, authenticated, service_role to authenticator;

grant usage on schema auth to anon, authenticated, service_role;

create table if not exists public.user_roles (
  user_id uuid primary key,
  role    text not null check (role in ('buyer', 'supplier', 'admin'))
);

create or replace function public.is_admin() returns boolean
language sql stable security definer set search_path = public as $$
  select exists (select 1 from public.user_roles where user_id = auth.uid() and role = 'admin')
$$;

create table if not exists public.orders (
  id         uuid primary key default gen_random_uuid(),
  buyer_id   uuid not null,
  title      text not null,
  status     text not null default 'pending',
  created_at timestamptz not null default now()
);

create table if not exists public.supplier_orders (
  id          uuid primary key default gen_random_uuid(),
  order_id    uuid not null references public.orders(id) on delete cascade,
  supplier_id uuid not null,
  status      text not null default 'in_progress'
);

create table if not exists public.production_stages (
  id                    uuid primary key default gen_random_uuid(),
  supplier_order_id     uuid not null references public.supplier_orders(id) on delete cascade,
  stage_name            text not null,
  completion_percentage integer not null default 0 check (completion_percentage between 0 and 100),
  started_at            timestamptz,
  completed_at          timestamptz,
  metadata              jsonb not null default '{}'
);

create table if not exists public.order_updates (
  id                    uuid primary key default gen_random_uuid(),
  order_id              uuid not null references public.orders(id) on delete cascade,
  stage                 text not null,
  message               text,
  completion_percentage integer,
  created_at            timestamptz not null default now(),
  created_by            uuid
);

create table if not exists public.messages (
  id           uuid primary key default gen_random_uuid(),
  subject      text,
  message      text not null,
  sender_id    uuid not null,
  recipient_id uuid not null,
  order_id     uuid references public.orders(id) on delete set null,
  read         boolean not null default false,
  created_at   timestamptz not null default now(),
  attachments  text[] not null default '{}'
);

create table if not exists public.notifications (
  id         uuid primary key default gen_random_uuid(),
  user_id    uuid not null,
  title      text not null,
  message    text not null,
  type       text not null default 'info',
  link       text,
  read       boolean not null default false,
  created_at timestamptz not null default now()
);

create table if not exists public.supplier_messages (
  id                uuid primary key default gen_random_uuid(),
  supplier_order_id uuid not null references public.supplier_orders(id) on delete cascade,
  sender_id         uuid not null,
  message           text not null,
  created_at        timestamptz not null default now()
);

-- Row-level security --------------------------------------------------------

alter table public.orders            enable row level security;
alter table public.supplier_orders   enable row level security;
alter table public.production_stages enable row level security;
alter table public.order_updates     enable row level security;
alter table public.messages          enable row level security;
alter table public.notifications     enable row level security;
alter table public.supplier_messages enable row level security;

-- Messages: you see what you sent or received; you send as yourself; only the
-- recipient updates (marks as read).
create policy messages_view on public.messages for select
  using (auth.uid() in (sender_id, recipient_id));
create policy messages_send on public.messages for insert
  with check (sender_id = auth.uid());
create policy messages_update on public.messages for update
  using (recipient_id = auth.uid());

-- Notifications belong to one user.
create policy notifications_own on public.notifications for all
  using (user_id = auth.uid());

-- Orders: the buyer, the assigned suppliers, and admins. Each of the two
-- tables' policies asks about the other through a SECURITY DEFINER helper:
-- policies that query each other directly recurse (Postgres raises
-- "infinite recursion detected in policy"), which the seed app's schema
-- does for any user who reads production stages or order updates.
create or replace function public.buys_order(order_id uuid) returns boolean
language sql stable security definer set search_path = public as $$
  select exists (select 1 from public.orders o where o.id = order_id and o.buyer_id = auth.uid())
$$;

create or replace function public.supplies_order(order_id uuid) returns boolean
language sql stable security definer set search_path = public as $$
  select exists (select 1 from public.supplier_orders so where so.order_id = supplies_order.order_id
                 and so.supplier_id = auth.uid())
$$;

create policy orders_view on public.orders for select
  using (buyer_id = auth.uid() or public.is_admin() or public.supplies_order(id));

create policy supplier_orders_view on public.supplier_orders for select
  using (supplier_id = auth.uid() or public.is_admin() or public.buys_order(order_id));

-- Production stages and supplier messages follow their supplier order.
create policy production_stages_view on public.production_stages for select
  using (exists (select 1 from public.supplier_orders so where so.id = production_stages.supplier_order_id));
create policy supplier_messages_view on public.supplier_messages for select
  using (exists (select 1 from public.supplier_orders so where so.id = supplier_messages.supplier_order_id));

-- Order updates follow their order.
create policy order_updates_view on public.order_updates for select
  using (exists (select 1 from public.orders o where o.id = order_updates.order_id));

grant usage on schema public to anon, authenticated, service_role;
grant select on all tables in schema public to authenticated, service_role;
grant insert, update on public.messages, public.notifications to authenticated;

-- Realtime: the same two statements a Supabase migration uses.
do $$ begin
  if not exists (select from pg_publication where pubname = 'supabase_realtime') then
    create publication supabase_realtime;
  end if;
end $$;

alter publication supabase_realtime add table
  public.messages, public.notifications, public.production_stages,
  public.order_updates, public.supplier_messages;

alter table public.production_stages replica identity full;
alter table public.messages          replica identity full;

-- Private channels: one per order, topic 'order:<order id>', for the order's
-- buyer, its suppliers and admins (broadcast and presence alike). pg_realtime
-- asks these policies on realtime.messages when a private channel joins
-- (SELECT: may it read), on its first broadcast (INSERT: may it write), and
-- again after each token refresh.
create or replace function public.order_topic_member() returns boolean
language sql stable as $$
  select case when realtime.topic() ~ '^order:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
              then (select public.buys_order(o) or public.supplies_order(o) or public.is_admin()
                    from (select substr(realtime.topic(), 7)::uuid as o) t)
              else false end
$$;

create policy order_channel_read on realtime.messages for select to authenticated
  using (extension in ('broadcast', 'presence') and public.order_topic_member());
create policy order_channel_write on realtime.messages for insert to authenticated
  with check (extension in ('broadcast', 'presence') and public.order_topic_member());

-- Order updates also go to the order's private channel as a broadcast, as
-- Supabase's "Broadcast from the database" has it: members of
-- 'order:<order id>' get each update at commit, in commit order, as
-- {record, old_record, operation, table, schema, id}. (SECURITY DEFINER:
-- the trigger may send whoever writes the update.)
create or replace function public.broadcast_order_update() returns trigger
language plpgsql security definer set search_path = public as $$
begin
  perform realtime.broadcast_changes(
    'order:' || coalesce(new.order_id, old.order_id)::text,
    tg_op, tg_op, tg_table_name, tg_table_schema, new, old);
  return null;
end
$$;

drop trigger if exists order_updates_broadcast on public.order_updates;
create trigger order_updates_broadcast after insert or update or delete on public.order_updates
  for each row execute function public.broadcast_order_update();
