"""Who may call what: principals and roles from tokens and client certificates, the
authorization interceptor, and ckptd's TLS material (certificates, tokens)."""
