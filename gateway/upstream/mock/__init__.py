"""Building blocks of the mock model upstream (see ``gateway.upstream.mock_server``).

Split by concern so each module stays small: request controls and options, recorded state,
deterministic text/token planning, error bodies, and one module per API family that turns a
plan into a JSON body or a list of SSE frames.
"""
