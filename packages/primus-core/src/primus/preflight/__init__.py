"""`primus preflight`: check every node of a job before it trains."""
