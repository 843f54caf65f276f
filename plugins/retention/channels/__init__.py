"""Channel clients: one per provider, credentials passed in, no Airflow import.

`base` holds the interface the dispatcher uses; each provider module uses the vendor's
SDK (or plain HTTP where the vendor has none) and maps every non-2xx answer to a failed
result or a retry.
"""
