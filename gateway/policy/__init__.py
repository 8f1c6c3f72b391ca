"""The policy language: schema, compiler, evaluator, tests, explain and hot reload."""
