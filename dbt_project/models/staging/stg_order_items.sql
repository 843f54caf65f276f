-- order lines count from their order's ordered_at (macros/staging.sql)
{{ purchase_lines_as_of('order_items', 'orders', 'order_id', 'ordered_at') }}
