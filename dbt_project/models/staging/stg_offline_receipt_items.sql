-- receipt lines count from their receipt's purchased_at (macros/staging.sql)
{{ purchase_lines_as_of('offline_receipt_items', 'offline_receipts', 'receipt_id', 'purchased_at') }}
