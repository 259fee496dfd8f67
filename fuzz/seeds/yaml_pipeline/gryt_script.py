from gryt import Pipeline, CommandStep

PIPELINE = Pipeline([CommandStep("a", {"cmd": ["true"]})])
