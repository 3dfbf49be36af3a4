package discovery

// AgentNamespaceFrom is AgentNamespace reading the service account's
// namespace from saFile, for tests.
func AgentNamespaceFrom(getenv func(string) string, saFile string) (string, string, error) {
	return agentNamespace(getenv, saFile)
}
