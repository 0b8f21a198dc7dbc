"""Example engines (run as scripts by recipes); a package so installs carry them."""
