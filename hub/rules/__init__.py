"""Pure rules, values in and values out: names, login names and grants, port choice, the chooser."""
