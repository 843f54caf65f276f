-- Fragment of the floors (bench/bench_floors.py expands `-- include: _customers.sql`):
-- the customers existing as of as_of and who owns a loyalty card or a phone number.
-- customers: a customer exists from sign-up or from their first online order, whichever
-- is earlier; phone_digits is the phone normalised as in CONTRACT.md section 2 (digits
-- only, a leading 00 dropped, 0XXXXXXXXX and 80XXXXXXXXX made 380XXXXXXXXX, 8 to 15 digits).
-- card_owner, phone_owner: a card or phone identifies a customer when exactly one
-- existing customer has it. {as_of} is replaced by a timestamptz literal.
customers as (

    -- a customer exists from sign-up or from their first online order, whichever is earlier
    select
        c.customer_id,
        nullif(trim(c.loyalty_card_id), '') as loyalty_card_id,
        substring(regexp_replace(regexp_replace(regexp_replace(coalesce(nullif(trim(c.phone), ''), ''),
            '[^0-9]', '', 'g'), '^00', ''), '^8?0([1-9][0-9]{{8}})$', '380\1')
            from '^[0-9]{{8,15}}$') as phone_digits
    from raw.customers as c
    where c.created_at is null or c.created_at <= {as_of}
       or exists (select 1 from raw.orders as o
                  where o.customer_id = c.customer_id and o.ordered_at <= {as_of})

),

card_owner as (

    select loyalty_card_id, min(customer_id) as customer_id
    from customers where loyalty_card_id is not null
    group by loyalty_card_id having count(*) = 1

),

phone_owner as (

    select phone_digits, min(customer_id) as customer_id
    from customers where phone_digits is not null
    group by phone_digits having count(*) = 1

),
