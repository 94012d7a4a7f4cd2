collect_ignore_glob = ["*"]  # atheris targets, run by `make fuzz`, not by pytest
