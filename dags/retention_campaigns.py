"""
### Scheduled campaigns

One DAG per scheduled campaign file in `include/campaigns/` (kind promo or lifecycle with a
`schedule`), besides the weekly cascade, which has its own DAG file. A marketer adds a
campaign by adding a YAML file; a wrong file shows up as an import error naming its line.
"""

from retention.campaigns.spec import load_all
from retention_airflow.campaign_dag import campaign_dag

for _campaign in load_all().values():
    if _campaign.schedule and _campaign.id != "weekly_promo" and _campaign.kind == "promo":
        globals()[f"campaign_{_campaign.id}"] = campaign_dag(_campaign.id)
