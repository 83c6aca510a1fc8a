"""Layer 7: running the grid -- runner, grid, tracking, aggregation, report, estimate, re-export, CLI."""
