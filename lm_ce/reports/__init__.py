"""What people and machines read: results.json's figures and contract, the console and Markdown tables, the plots,
results.html, two runs compared (lm-ce compare) and shards merged (lm-ce merge).

May import: errors, files, compat, config, data, model, sums, rundir, scoring.
"""
