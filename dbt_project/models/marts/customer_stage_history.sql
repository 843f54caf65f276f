-- One row per customer and build as_of: the customer's lifecycle stage, RFM segment and
-- RFM scores as customer_lifetime computed them for that as_of. Each build adds (or, for
-- an as_of built before, replaces) its own snapshot; the snapshots of other as_ofs stay.
-- The rules are in customer_stage_history.yml.
select
    customer_id,
    as_of,
    lifecycle_stage,
    rfm_segment,
    r_score,
    f_score,
    m_score

from {{ ref('customer_lifetime') }}
