package agent

import (
	"fmt"
	"net"

	"github.com/portway/portway/internal/protocol"
)

// ClientCommand returns a ready-to-paste command for reaching a service at
// its public endpoint ("host:port"), chosen by the port the service is known
// by: psql for 5432, redis-cli for 6379, ssh for 22/2222, and so on. Other
// services get the bare host:port.
func ClientCommand(kind protocol.Kind, port int, endpoint string) string {
	host, pport, err := net.SplitHostPort(endpoint)
	if err != nil {
		return endpoint
	}
	if kind == protocol.KindUDP {
		if port == 53 {
			return fmt.Sprintf("dig @%s -p %s example.com", host, pport)
		}
		return fmt.Sprintf("%s (udp)", endpoint)
	}
	switch port {
	case 5432:
		return fmt.Sprintf("psql -h %s -p %s", host, pport)
	case 6379:
		return fmt.Sprintf("redis-cli -h %s -p %s", host, pport)
	case 22, 2222:
		return fmt.Sprintf("ssh -p %s user@%s", pport, host)
	case 3306:
		return fmt.Sprintf("mysql -h %s -P %s", host, pport)
	case 27017:
		return fmt.Sprintf("mongosh --host %s --port %s", host, pport)
	case 80, 8080:
		return fmt.Sprintf("curl http://%s/", endpoint)
	}
	return endpoint
}
