"""`muge bench`: one module per subcommand, each measuring ours against the obvious alternative
in one run. The benches alone reach across every stage (they train, export and predict);
no stage imports them."""
