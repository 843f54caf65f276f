-- Floor of marts.message_attribution (bench/bench_floors.py): one statement. "From raw"
-- here means raw.orders, raw.offline_receipts and raw.customers (the purchases of
-- int_purchases_unified: paid or delivered orders, receipts matched by loyalty card,
-- else phone, to a customer existing as of as_of) and the ledger ops.messages; the
-- touches, windows and the rules of credit are those of _attribution.sql. One row per
-- message and the conversion it earns. {as_of} is replaced by a timestamptz literal.
-- Every column is compared exactly.
with

-- include: _attribution.sql

attributed as (

    select
        message_id || ':' || conversion_source || ':' || conversion_id as attribution_id,
        message_id, customer_id, conversion_id, conversion_source, converted_at, revenue,
        campaign_id, run_id, step, channel, variant, is_holdout,
        touched_at as message_at,
        window_hours,
        (extract(epoch from converted_at - touched_at) / 86400)::float8 * 24 as hours_to_conversion,
        conversion_source || ':' || conversion_id as conversion_key,
        {as_of} as as_of
    from credited

)

select * from attributed
