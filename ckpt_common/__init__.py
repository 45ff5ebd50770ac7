"""Small pieces shared by ckptd, the agent, the receiver and the CLI. Imports nothing heavy."""
