-- The schema of a database made by the release before migrations: its run-time DDL
-- (db.schema.ensure_schemas, triggers.state.ensure_trigger_tables,
-- results.webhook.ensure_results_tables, ingest.quality.QUALITY_DDL,
-- warehouse.predict.PREDICT_DDL, ingest.load.ensure_cast_functions) run into an empty
-- database, then `pg_dump --schema-only --no-owner --no-privileges` (PostgreSQL 16.2).
-- tests/test_migrations.py restores it and upgrades it to head.
--
-- PostgreSQL database dump
--

-- Dumped from database version 16.2
-- Dumped by pg_dump version 16.2

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

--
-- Name: marts; Type: SCHEMA; Schema: -; Owner: -
--

CREATE SCHEMA marts;


--
-- Name: ops; Type: SCHEMA; Schema: -; Owner: -
--

CREATE SCHEMA ops;


--
-- Name: raw; Type: SCHEMA; Schema: -; Owner: -
--

CREATE SCHEMA raw;


--
-- Name: try_timestamptz(text); Type: FUNCTION; Schema: ops; Owner: -
--

CREATE FUNCTION ops.try_timestamptz(v text) RETURNS timestamp with time zone
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $_$
          select case
            when v ~ '^[1-9]\d{3}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[T ]([01]\d|2[0-3]):[0-5]\d(:([0-5]\d|60)(\.\d{1,6})?)?([Zz]|[+-](0\d|1[0-4])(:?[0-5]\d)?)$'
             and substr(v, 9, 2)::int <= extract(day from (make_date(substr(v, 1, 4)::int,
                   substr(v, 6, 2)::int, 1) + interval '1 month - 1 day'))
            then v::timestamptz end
        $_$;


SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: customer_predicted_value; Type: TABLE; Schema: marts; Owner: -
--

CREATE TABLE marts.customer_predicted_value (
    customer_id text NOT NULL,
    as_of timestamp with time zone NOT NULL,
    purchases integer NOT NULL,
    frequency integer,
    recency double precision,
    age double precision,
    time_unit interval NOT NULL,
    probability_alive double precision,
    expected_purchases_90d double precision,
    expected_purchases_365d double precision,
    expected_avg_order_value double precision,
    predicted_value_12m double precision
);


--
-- Name: predicted_value_fits; Type: TABLE; Schema: marts; Owner: -
--

CREATE TABLE marts.predicted_value_fits (
    as_of timestamp with time zone NOT NULL,
    model text NOT NULL,
    params jsonb NOT NULL,
    log_likelihood double precision NOT NULL,
    customers integer NOT NULL,
    converged boolean NOT NULL,
    fitted_for timestamp with time zone NOT NULL,
    run_id text,
    time_unit interval NOT NULL,
    distinct_rows integer NOT NULL,
    iterations integer NOT NULL,
    message text,
    CONSTRAINT predicted_value_fits_model_check CHECK ((model = ANY (ARRAY['bgnbd'::text, 'gamma_gamma'::text])))
);


--
-- Name: audience_members; Type: TABLE; Schema: ops; Owner: -
--

CREATE TABLE ops.audience_members (
    run_id text NOT NULL,
    customer_id text NOT NULL,
    variant text NOT NULL,
    holdout_kind text
);


--
-- Name: campaign_runs; Type: TABLE; Schema: ops; Owner: -
--

CREATE TABLE ops.campaign_runs (
    run_id text NOT NULL,
    campaign_id text NOT NULL,
    as_of timestamp with time zone NOT NULL,
    spec_hash text NOT NULL,
    spec jsonb NOT NULL,
    audience_size integer NOT NULL,
    holdout_size integer NOT NULL,
    created_at timestamp with time zone NOT NULL
);


--
-- Name: chain_instances; Type: TABLE; Schema: ops; Owner: -
--

CREATE TABLE ops.chain_instances (
    chain_id text NOT NULL,
    trigger text NOT NULL,
    campaign_id text NOT NULL,
    customer_id text NOT NULL,
    subject text NOT NULL,
    status text NOT NULL,
    started_at timestamp with time zone NOT NULL,
    anchor_at timestamp with time zone NOT NULL,
    next_step integer,
    next_step_at timestamp with time zone,
    variant text NOT NULL,
    holdout_kind text,
    context jsonb DEFAULT '{}'::jsonb NOT NULL,
    extensions integer DEFAULT 0 NOT NULL,
    exit_reason text,
    ended_at timestamp with time zone,
    created_by_run timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    CONSTRAINT chain_instances_status_check CHECK ((status = ANY (ARRAY['active'::text, 'completed'::text, 'exited'::text])))
);


--
-- Name: claims; Type: TABLE; Schema: ops; Owner: -
--

CREATE TABLE ops.claims (
    claim_token text NOT NULL,
    claim_owner bigint NOT NULL,
    lease_until timestamp with time zone NOT NULL,
    sending_at timestamp with time zone,
    claimed_at timestamp with time zone NOT NULL
);


--
-- Name: consent_changes; Type: TABLE; Schema: ops; Owner: -
--

CREATE TABLE ops.consent_changes (
    channel text NOT NULL,
    address text NOT NULL,
    unsubscribed_at timestamp with time zone NOT NULL,
    source text NOT NULL,
    reason text
);


--
-- Name: data_quality_results; Type: TABLE; Schema: ops; Owner: -
--

CREATE TABLE ops.data_quality_results (
    run_key text NOT NULL,
    load_id bigint,
    as_of timestamp with time zone NOT NULL,
    table_name text NOT NULL,
    expectation text NOT NULL,
    column_name text,
    severity text NOT NULL,
    success boolean NOT NULL,
    observed_value jsonb,
    kwargs jsonb DEFAULT '{}'::jsonb NOT NULL,
    checked_at timestamp with time zone NOT NULL
);


--
-- Name: deactivated_addresses; Type: TABLE; Schema: ops; Owner: -
--

CREATE TABLE ops.deactivated_addresses (
    channel text NOT NULL,
    address text NOT NULL,
    deactivated_at timestamp with time zone NOT NULL,
    reason text NOT NULL
);


--
-- Name: loads; Type: TABLE; Schema: ops; Owner: -
--

CREATE TABLE ops.loads (
    load_id bigint NOT NULL,
    source text NOT NULL,
    format text NOT NULL,
    loaded_at timestamp with time zone NOT NULL,
    status text NOT NULL,
    summary jsonb DEFAULT '{}'::jsonb NOT NULL,
    error text
);


--
-- Name: loads_load_id_seq; Type: SEQUENCE; Schema: ops; Owner: -
--

CREATE SEQUENCE ops.loads_load_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: loads_load_id_seq; Type: SEQUENCE OWNED BY; Schema: ops; Owner: -
--

ALTER SEQUENCE ops.loads_load_id_seq OWNED BY ops.loads.load_id;


--
-- Name: message_events; Type: TABLE; Schema: ops; Owner: -
--

CREATE TABLE ops.message_events (
    provider text NOT NULL,
    provider_event_id text NOT NULL,
    message_id text,
    event_type text NOT NULL,
    occurred_at timestamp with time zone NOT NULL,
    address text,
    payload jsonb DEFAULT '{}'::jsonb NOT NULL,
    received_at timestamp with time zone NOT NULL
);


--
-- Name: messages; Type: TABLE; Schema: ops; Owner: -
--

CREATE TABLE ops.messages (
    message_id text NOT NULL,
    campaign_id text NOT NULL,
    run_id text NOT NULL,
    step text NOT NULL,
    channel text NOT NULL,
    customer_id text NOT NULL,
    variant text NOT NULL,
    status text NOT NULL,
    reason text,
    provider_message_id text,
    planned_at timestamp with time zone NOT NULL,
    sent_at timestamp with time zone,
    step_index integer DEFAULT 0 NOT NULL,
    cap_class text DEFAULT 'promo'::text NOT NULL,
    address text,
    not_before timestamp with time zone,
    claim_token text,
    claimed_at timestamp with time zone,
    attempts integer DEFAULT 0 NOT NULL,
    subject_key text,
    settle_after timestamp with time zone,
    CONSTRAINT messages_status_check CHECK ((status = ANY (ARRAY['planned'::text, 'sent'::text, 'failed'::text, 'suppressed'::text, 'holdout'::text, 'unknown'::text])))
);


--
-- Name: quarantine; Type: TABLE; Schema: ops; Owner: -
--

CREATE TABLE ops.quarantine (
    table_name text NOT NULL,
    source_file text NOT NULL,
    line_no bigint NOT NULL,
    reason text NOT NULL,
    record jsonb NOT NULL,
    load_id bigint NOT NULL,
    quarantined_at timestamp with time zone NOT NULL
);


--
-- Name: report_deliveries; Type: TABLE; Schema: ops; Owner: -
--

CREATE TABLE ops.report_deliveries (
    week_start date NOT NULL,
    recipient text NOT NULL,
    report_file text NOT NULL,
    provider_message_id text,
    sent_at timestamp with time zone NOT NULL
);


--
-- Name: shop_settings; Type: TABLE; Schema: ops; Owner: -
--

CREATE TABLE ops.shop_settings (
    key text NOT NULL,
    value text NOT NULL,
    set_at timestamp with time zone NOT NULL,
    set_by text NOT NULL
);


--
-- Name: trigger_health; Type: TABLE; Schema: ops; Owner: -
--

CREATE TABLE ops.trigger_health (
    trigger text NOT NULL,
    interval_start timestamp with time zone NOT NULL,
    interval_end timestamp with time zone NOT NULL,
    source_rows bigint,
    started integer NOT NULL,
    extended integer NOT NULL,
    expected double precision,
    history_runs integer NOT NULL,
    flagged boolean NOT NULL,
    note text
);


--
-- Name: trigger_hits; Type: TABLE; Schema: ops; Owner: -
--

CREATE TABLE ops.trigger_hits (
    trigger text NOT NULL,
    customer_id text NOT NULL,
    event_key text NOT NULL,
    subject text NOT NULL,
    hit_at timestamp with time zone NOT NULL,
    anchor_at timestamp with time zone NOT NULL,
    chain_id text NOT NULL,
    outcome text NOT NULL,
    run_end timestamp with time zone NOT NULL,
    CONSTRAINT trigger_hits_outcome_check CHECK ((outcome = ANY (ARRAY['started'::text, 'extended'::text])))
);


--
-- Name: trigger_watermarks; Type: TABLE; Schema: ops; Owner: -
--

CREATE TABLE ops.trigger_watermarks (
    trigger text NOT NULL,
    scanned_until timestamp with time zone NOT NULL
);


--
-- Name: webhook_batches; Type: TABLE; Schema: ops; Owner: -
--

CREATE TABLE ops.webhook_batches (
    batch_id text NOT NULL,
    provider text NOT NULL,
    received_at timestamp with time zone NOT NULL,
    signature_verified boolean NOT NULL,
    events integer NOT NULL,
    inserted integer NOT NULL,
    duplicates integer NOT NULL,
    invalid integer NOT NULL,
    unmatched integer NOT NULL,
    consent_changes integer NOT NULL,
    deliveries integer DEFAULT 1 NOT NULL,
    source_file text
);


--
-- Name: channel_subscriptions; Type: TABLE; Schema: raw; Owner: -
--

CREATE TABLE raw.channel_subscriptions (
    customer_id text NOT NULL,
    channel text NOT NULL,
    address text NOT NULL,
    subscribed_at timestamp with time zone,
    unsubscribed_at timestamp with time zone
);


--
-- Name: customers; Type: TABLE; Schema: raw; Owner: -
--

CREATE TABLE raw.customers (
    customer_id text NOT NULL,
    email text,
    phone text,
    loyalty_card_id text,
    created_at timestamp with time zone,
    timezone text,
    city text,
    country text
);


--
-- Name: events; Type: TABLE; Schema: raw; Owner: -
--

CREATE TABLE raw.events (
    event_id text NOT NULL,
    occurred_at timestamp with time zone,
    event_type text,
    customer_id text,
    session_id text,
    product_id text,
    category_path text,
    price numeric(18,2),
    search_query text
);


--
-- Name: offline_receipt_items; Type: TABLE; Schema: raw; Owner: -
--

CREATE TABLE raw.offline_receipt_items (
    receipt_id text NOT NULL,
    line_no integer NOT NULL,
    product_id text,
    quantity integer,
    unit_price numeric(18,2)
);


--
-- Name: offline_receipts; Type: TABLE; Schema: raw; Owner: -
--

CREATE TABLE raw.offline_receipts (
    receipt_id text NOT NULL,
    store_id text,
    purchased_at timestamp with time zone,
    loyalty_card_id text,
    phone text,
    total_amount numeric(18,2),
    currency text
);


--
-- Name: order_items; Type: TABLE; Schema: raw; Owner: -
--

CREATE TABLE raw.order_items (
    order_id text NOT NULL,
    line_no integer NOT NULL,
    product_id text,
    quantity integer,
    unit_price numeric(18,2)
);


--
-- Name: orders; Type: TABLE; Schema: raw; Owner: -
--

CREATE TABLE raw.orders (
    order_id text NOT NULL,
    customer_id text,
    ordered_at timestamp with time zone,
    status text,
    total_amount numeric(18,2),
    currency text,
    payment_method text,
    cancel_reason text
);


--
-- Name: product_changes; Type: TABLE; Schema: raw; Owner: -
--

CREATE TABLE raw.product_changes (
    product_id text NOT NULL,
    changed_at timestamp with time zone NOT NULL,
    price numeric(18,2),
    in_stock boolean
);


--
-- Name: products; Type: TABLE; Schema: raw; Owner: -
--

CREATE TABLE raw.products (
    product_id text NOT NULL,
    name text,
    category_path text,
    brand text,
    price numeric(18,2),
    in_stock boolean,
    updated_at timestamp with time zone
);


--
-- Name: loads load_id; Type: DEFAULT; Schema: ops; Owner: -
--

ALTER TABLE ONLY ops.loads ALTER COLUMN load_id SET DEFAULT nextval('ops.loads_load_id_seq'::regclass);


--
-- Name: customer_predicted_value customer_predicted_value_pkey; Type: CONSTRAINT; Schema: marts; Owner: -
--

ALTER TABLE ONLY marts.customer_predicted_value
    ADD CONSTRAINT customer_predicted_value_pkey PRIMARY KEY (as_of, customer_id);


--
-- Name: predicted_value_fits predicted_value_fits_pkey; Type: CONSTRAINT; Schema: marts; Owner: -
--

ALTER TABLE ONLY marts.predicted_value_fits
    ADD CONSTRAINT predicted_value_fits_pkey PRIMARY KEY (as_of, model);


--
-- Name: audience_members audience_members_pkey; Type: CONSTRAINT; Schema: ops; Owner: -
--

ALTER TABLE ONLY ops.audience_members
    ADD CONSTRAINT audience_members_pkey PRIMARY KEY (run_id, customer_id);


--
-- Name: campaign_runs campaign_runs_pkey; Type: CONSTRAINT; Schema: ops; Owner: -
--

ALTER TABLE ONLY ops.campaign_runs
    ADD CONSTRAINT campaign_runs_pkey PRIMARY KEY (run_id);


--
-- Name: chain_instances chain_instances_pkey; Type: CONSTRAINT; Schema: ops; Owner: -
--

ALTER TABLE ONLY ops.chain_instances
    ADD CONSTRAINT chain_instances_pkey PRIMARY KEY (chain_id);


--
-- Name: claims claims_pkey; Type: CONSTRAINT; Schema: ops; Owner: -
--

ALTER TABLE ONLY ops.claims
    ADD CONSTRAINT claims_pkey PRIMARY KEY (claim_token);


--
-- Name: consent_changes consent_changes_pkey; Type: CONSTRAINT; Schema: ops; Owner: -
--

ALTER TABLE ONLY ops.consent_changes
    ADD CONSTRAINT consent_changes_pkey PRIMARY KEY (channel, address);


--
-- Name: deactivated_addresses deactivated_addresses_pkey; Type: CONSTRAINT; Schema: ops; Owner: -
--

ALTER TABLE ONLY ops.deactivated_addresses
    ADD CONSTRAINT deactivated_addresses_pkey PRIMARY KEY (channel, address);


--
-- Name: loads loads_pkey; Type: CONSTRAINT; Schema: ops; Owner: -
--

ALTER TABLE ONLY ops.loads
    ADD CONSTRAINT loads_pkey PRIMARY KEY (load_id);


--
-- Name: message_events message_events_pkey; Type: CONSTRAINT; Schema: ops; Owner: -
--

ALTER TABLE ONLY ops.message_events
    ADD CONSTRAINT message_events_pkey PRIMARY KEY (provider, provider_event_id);


--
-- Name: messages messages_pkey; Type: CONSTRAINT; Schema: ops; Owner: -
--

ALTER TABLE ONLY ops.messages
    ADD CONSTRAINT messages_pkey PRIMARY KEY (message_id);


--
-- Name: quarantine quarantine_pkey; Type: CONSTRAINT; Schema: ops; Owner: -
--

ALTER TABLE ONLY ops.quarantine
    ADD CONSTRAINT quarantine_pkey PRIMARY KEY (table_name, source_file, line_no);


--
-- Name: report_deliveries report_deliveries_pkey; Type: CONSTRAINT; Schema: ops; Owner: -
--

ALTER TABLE ONLY ops.report_deliveries
    ADD CONSTRAINT report_deliveries_pkey PRIMARY KEY (week_start, recipient);


--
-- Name: shop_settings shop_settings_pkey; Type: CONSTRAINT; Schema: ops; Owner: -
--

ALTER TABLE ONLY ops.shop_settings
    ADD CONSTRAINT shop_settings_pkey PRIMARY KEY (key);


--
-- Name: trigger_health trigger_health_pkey; Type: CONSTRAINT; Schema: ops; Owner: -
--

ALTER TABLE ONLY ops.trigger_health
    ADD CONSTRAINT trigger_health_pkey PRIMARY KEY (trigger, interval_end);


--
-- Name: trigger_hits trigger_hits_pkey; Type: CONSTRAINT; Schema: ops; Owner: -
--

ALTER TABLE ONLY ops.trigger_hits
    ADD CONSTRAINT trigger_hits_pkey PRIMARY KEY (trigger, customer_id, event_key);


--
-- Name: trigger_watermarks trigger_watermarks_pkey; Type: CONSTRAINT; Schema: ops; Owner: -
--

ALTER TABLE ONLY ops.trigger_watermarks
    ADD CONSTRAINT trigger_watermarks_pkey PRIMARY KEY (trigger);


--
-- Name: webhook_batches webhook_batches_pkey; Type: CONSTRAINT; Schema: ops; Owner: -
--

ALTER TABLE ONLY ops.webhook_batches
    ADD CONSTRAINT webhook_batches_pkey PRIMARY KEY (batch_id);


--
-- Name: channel_subscriptions channel_subscriptions_pkey; Type: CONSTRAINT; Schema: raw; Owner: -
--

ALTER TABLE ONLY raw.channel_subscriptions
    ADD CONSTRAINT channel_subscriptions_pkey PRIMARY KEY (customer_id, channel, address);


--
-- Name: customers customers_pkey; Type: CONSTRAINT; Schema: raw; Owner: -
--

ALTER TABLE ONLY raw.customers
    ADD CONSTRAINT customers_pkey PRIMARY KEY (customer_id);


--
-- Name: events events_pkey; Type: CONSTRAINT; Schema: raw; Owner: -
--

ALTER TABLE ONLY raw.events
    ADD CONSTRAINT events_pkey PRIMARY KEY (event_id);


--
-- Name: offline_receipt_items offline_receipt_items_pkey; Type: CONSTRAINT; Schema: raw; Owner: -
--

ALTER TABLE ONLY raw.offline_receipt_items
    ADD CONSTRAINT offline_receipt_items_pkey PRIMARY KEY (receipt_id, line_no);


--
-- Name: offline_receipts offline_receipts_pkey; Type: CONSTRAINT; Schema: raw; Owner: -
--

ALTER TABLE ONLY raw.offline_receipts
    ADD CONSTRAINT offline_receipts_pkey PRIMARY KEY (receipt_id);


--
-- Name: order_items order_items_pkey; Type: CONSTRAINT; Schema: raw; Owner: -
--

ALTER TABLE ONLY raw.order_items
    ADD CONSTRAINT order_items_pkey PRIMARY KEY (order_id, line_no);


--
-- Name: orders orders_pkey; Type: CONSTRAINT; Schema: raw; Owner: -
--

ALTER TABLE ONLY raw.orders
    ADD CONSTRAINT orders_pkey PRIMARY KEY (order_id);


--
-- Name: product_changes product_changes_pkey; Type: CONSTRAINT; Schema: raw; Owner: -
--

ALTER TABLE ONLY raw.product_changes
    ADD CONSTRAINT product_changes_pkey PRIMARY KEY (product_id, changed_at);


--
-- Name: products products_pkey; Type: CONSTRAINT; Schema: raw; Owner: -
--

ALTER TABLE ONLY raw.products
    ADD CONSTRAINT products_pkey PRIMARY KEY (product_id);


--
-- Name: chain_instances_customer; Type: INDEX; Schema: ops; Owner: -
--

CREATE INDEX chain_instances_customer ON ops.chain_instances USING btree (customer_id);


--
-- Name: chain_instances_due; Type: INDEX; Schema: ops; Owner: -
--

CREATE INDEX chain_instances_due ON ops.chain_instances USING btree (campaign_id, next_step, next_step_at) WHERE (status = 'active'::text);


--
-- Name: chain_instances_one_active; Type: INDEX; Schema: ops; Owner: -
--

CREATE UNIQUE INDEX chain_instances_one_active ON ops.chain_instances USING btree (trigger, customer_id, subject) WHERE (status = 'active'::text);


--
-- Name: claims_owner; Type: INDEX; Schema: ops; Owner: -
--

CREATE INDEX claims_owner ON ops.claims USING btree (claim_owner);


--
-- Name: consent_changes_lower; Type: INDEX; Schema: ops; Owner: -
--

CREATE INDEX consent_changes_lower ON ops.consent_changes USING btree (channel, lower(address));


--
-- Name: data_quality_results_as_of; Type: INDEX; Schema: ops; Owner: -
--

CREATE INDEX data_quality_results_as_of ON ops.data_quality_results USING btree (as_of);


--
-- Name: data_quality_results_key; Type: INDEX; Schema: ops; Owner: -
--

CREATE UNIQUE INDEX data_quality_results_key ON ops.data_quality_results USING btree (run_key, table_name, expectation, COALESCE(column_name, ''::text));


--
-- Name: deactivated_addresses_lower; Type: INDEX; Schema: ops; Owner: -
--

CREATE INDEX deactivated_addresses_lower ON ops.deactivated_addresses USING btree (channel, lower(address));


--
-- Name: message_events_message; Type: INDEX; Schema: ops; Owner: -
--

CREATE INDEX message_events_message ON ops.message_events USING btree (message_id, event_type);


--
-- Name: messages_claimed; Type: INDEX; Schema: ops; Owner: -
--

CREATE INDEX messages_claimed ON ops.messages USING btree (claim_token) WHERE (claim_token IS NOT NULL);


--
-- Name: messages_customer_planned; Type: INDEX; Schema: ops; Owner: -
--

CREATE INDEX messages_customer_planned ON ops.messages USING btree (customer_id, planned_at);


--
-- Name: messages_run_step; Type: INDEX; Schema: ops; Owner: -
--

CREATE INDEX messages_run_step ON ops.messages USING btree (run_id, step, status);


--
-- Name: trigger_hits_chain; Type: INDEX; Schema: ops; Owner: -
--

CREATE INDEX trigger_hits_chain ON ops.trigger_hits USING btree (chain_id);


--
-- Name: trigger_hits_run; Type: INDEX; Schema: ops; Owner: -
--

CREATE INDEX trigger_hits_run ON ops.trigger_hits USING btree (trigger, run_end);


--
-- Name: trg_events_customer_time; Type: INDEX; Schema: raw; Owner: -
--

CREATE INDEX trg_events_customer_time ON raw.events USING btree (customer_id, occurred_at);


--
-- Name: trg_events_product_time; Type: INDEX; Schema: raw; Owner: -
--

CREATE INDEX trg_events_product_time ON raw.events USING btree (product_id, occurred_at);


--
-- Name: trg_events_time; Type: INDEX; Schema: raw; Owner: -
--

CREATE INDEX trg_events_time ON raw.events USING btree (occurred_at);


--
-- Name: trg_orders_customer_time; Type: INDEX; Schema: raw; Owner: -
--

CREATE INDEX trg_orders_customer_time ON raw.orders USING btree (customer_id, ordered_at);


--
-- Name: trg_orders_time; Type: INDEX; Schema: raw; Owner: -
--

CREATE INDEX trg_orders_time ON raw.orders USING btree (ordered_at);


--
-- Name: trg_product_changes_time; Type: INDEX; Schema: raw; Owner: -
--

CREATE INDEX trg_product_changes_time ON raw.product_changes USING btree (changed_at);


--
-- Name: trg_subscriptions_time; Type: INDEX; Schema: raw; Owner: -
--

CREATE INDEX trg_subscriptions_time ON raw.channel_subscriptions USING btree (subscribed_at);


--
-- Name: audience_members audience_members_run_id_fkey; Type: FK CONSTRAINT; Schema: ops; Owner: -
--

ALTER TABLE ONLY ops.audience_members
    ADD CONSTRAINT audience_members_run_id_fkey FOREIGN KEY (run_id) REFERENCES ops.campaign_runs(run_id);


--
-- PostgreSQL database dump complete
--

