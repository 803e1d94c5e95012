-- Demo data for the marketplace schema. The user ids match the tokens that
-- `make run` prints (scripts/run-demo.sh).
insert into public.user_roles (user_id, role) values
  ('11111111-1111-1111-1111-111111111111', 'buyer'),
  ('22222222-2222-2222-2222-222222222222', 'supplier'),
  ('33333333-3333-3333-3333-333333333333', 'admin')
on conflict (user_id) do nothing;

insert into public.orders (id, buyer_id, title, status) values
  ('aaaaaaaa-0000-0000-0000-000000000001', '11111111-1111-1111-1111-111111111111', '500 ceramic mugs', 'in_production')
on conflict (id) do nothing;

insert into public.supplier_orders (id, order_id, supplier_id) values
  ('bbbbbbbb-0000-0000-0000-000000000001', 'aaaaaaaa-0000-0000-0000-000000000001', '22222222-2222-2222-2222-222222222222')
on conflict (id) do nothing;

insert into public.production_stages (supplier_order_id, stage_name, completion_percentage, started_at)
select 'bbbbbbbb-0000-0000-0000-000000000001', 'molding', 40, now()
where not exists (select 1 from public.production_stages);

insert into public.messages (subject, message, sender_id, recipient_id, order_id)
select 'Welcome', 'Your order is in production.', '22222222-2222-2222-2222-222222222222',
       '11111111-1111-1111-1111-111111111111', 'aaaaaaaa-0000-0000-0000-000000000001'
where not exists (select 1 from public.messages);
