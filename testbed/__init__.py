"""What the tests and the benchmarks both use to drive a real gateway: throwaway PAM accounts, a
gateway config on loopback, and a login + WebSocket terminal client. Test-only things (fixtures,
leak checks, log scanning) stay in tests/; timing and statistics stay in benchmarks/."""
