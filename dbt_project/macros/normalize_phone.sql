{#-
    normalize_phone(column): a phone written any way -> its E.164 digits (no '+'), or NULL.

    Used on both sides of the ROPO phone match (customers.phone and offline receipts),
    because tills and sign-up forms write the same number differently:

      '+380 67 123 45 67', '+38 (067) 123-45-67', '380671234567'  -> 380671234567
      '0671234567', '067 123 45 67'   (Ukrainian national format)  -> 380671234567
      '8 067 123 45 67'               (old long-distance prefix 8) -> 380671234567
      '00380671234567'                (international prefix 00)    -> 380671234567
      '+48 601 234 567'                                            -> 48601234567

    Steps: keep digits only; drop a leading international prefix 00; a Ukrainian national
    number (0 + 9 digits, or 80 + 9 digits) gets its country code 380. What is left must
    have 8 to 15 digits (E.164 allows 15), otherwise the phone cannot be matched: NULL.
-#}
{% macro normalize_phone(column) -%}
    substring(
        regexp_replace(
            regexp_replace(
                regexp_replace(coalesce({{ column }}, ''), '[^0-9]', '', 'g'),
                '^00', ''),
            '^8?0([1-9][0-9]{8})$', '380\1')
        from '^[0-9]{8,15}$')
{%- endmacro %}
