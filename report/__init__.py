"""Look at the results: a self-contained HTML retrieval report, for one run or two compared."""
