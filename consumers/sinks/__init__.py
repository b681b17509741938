"""Services that write the pipeline's canonical records into stores (analytics, CRM)."""
