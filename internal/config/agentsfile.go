package config

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/portway/portway/internal/protocol"
)

// The agents file (gateway.yaml's agents_file) holds agent identities one
// a line, for gateways that serve more agents than a hand-edited list in
// gateway.yaml holds comfortably:
//
//	# name     token hash                                                          options
//	prod-eu    sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//	prod-us    sha256:<64 hex>  sha256:<64 hex, the next token of a rotation>     max_services=20
//
// Fields are separated by spaces or tabs. A line holds the agent's name,
// one or two token hashes (the second is token_sha256_next of a rotation)
// and optional key=value settings: max_services and max_retained_ports.
// Blank lines and lines starting with # are ignored. Only hashes are
// accepted: the file is meant to be generated and copied around, so it
// never holds a secret. Every problem names the file and the line.

// maxAgentsFileLine bounds one line of the agents file.
const maxAgentsFileLine = 4 << 10

// ParseAgentsFile parses the contents of an agents file called name (used
// in errors as name:line). It returns the identities in file order, or
// every problem found, one per line.
func ParseAgentsFile(name string, data []byte) ([]AgentIdentity, error) {
	var out []AgentIdentity
	var errs []error
	seen := map[string]int{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 256), maxAgentsFileLine)
	line := 0
	for sc.Scan() {
		line++
		a, err := parseAgentLine(sc.Text())
		if err != nil {
			errs = append(errs, fmt.Errorf("%s:%d: %w", name, line, err))
			continue
		}
		if a == nil {
			continue
		}
		if first, dup := seen[a.Name]; dup {
			errs = append(errs, fmt.Errorf("%s:%d: agent %q is already on line %d", name, line, a.Name, first))
			continue
		}
		seen[a.Name] = line
		out = append(out, *a)
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			err = fmt.Errorf("line longer than %d bytes", maxAgentsFileLine)
		}
		errs = append(errs, fmt.Errorf("%s:%d: %w", name, line+1, err))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return out, nil
}

// parseAgentLine parses one line; a blank or comment line gives nil.
func parseAgentLine(s string) (*AgentIdentity, error) {
	f := strings.Fields(s)
	if len(f) == 0 || strings.HasPrefix(f[0], "#") {
		return nil, nil
	}
	a := &AgentIdentity{Name: f[0]}
	if err := protocol.ValidateServiceID(a.Name); err != nil || strings.Contains(a.Name, "/") {
		return nil, fmt.Errorf("agent name %q may hold only letters, digits and . _ -", a.Name)
	}
	hashes := 0
	for _, field := range f[1:] {
		if hex, ok := strings.CutPrefix(field, "sha256:"); ok {
			if err := checkTokenHash(hex); err != nil {
				return nil, fmt.Errorf("agent %q: %w", a.Name, err)
			}
			switch hashes {
			case 0:
				a.TokenSHA256 = strings.ToLower(hex)
			case 1:
				if strings.EqualFold(hex, a.TokenSHA256) {
					return nil, fmt.Errorf("agent %q: the second token hash is the same as the first", a.Name)
				}
				a.TokenSHA256Next = strings.ToLower(hex)
			default:
				return nil, fmt.Errorf("agent %q: more than two token hashes", a.Name)
			}
			hashes++
			continue
		}
		key, val, ok := strings.Cut(field, "=")
		if !ok {
			return nil, fmt.Errorf("agent %q: %q is neither sha256:<hex> nor key=value", a.Name, field)
		}
		n, err := strconv.Atoi(val)
		switch key {
		case "max_services":
			if err != nil || n < 1 || n > protocol.MaxRegisterServices {
				return nil, fmt.Errorf("agent %q: max_services %q is not a number in 1-%d", a.Name, val, protocol.MaxRegisterServices)
			}
			a.MaxServices = n
		case "max_retained_ports":
			if err != nil || n < 1 || n > maxRetainedPorts {
				return nil, fmt.Errorf("agent %q: max_retained_ports %q is not a number in 1-%d", a.Name, val, maxRetainedPorts)
			}
			a.MaxRetainedPorts = n
		default:
			return nil, fmt.Errorf("agent %q: unknown setting %q (want max_services or max_retained_ports)", a.Name, key)
		}
	}
	if hashes == 0 {
		return nil, fmt.Errorf("agent %q: no token hash (write sha256:<64 hex digits>, e.g. from `printf %%s TOKEN | sha256sum`)", a.Name)
	}
	return a, nil
}

func checkTokenHash(s string) error {
	if b, err := hex.DecodeString(s); err != nil || len(b) != 32 {
		return errors.New("a token hash must be sha256: and 64 hex digits")
	}
	return nil
}

// FormatAgentLine writes a as one line of an agents file (without the
// newline); ParseAgentsFile reads it back. a must hold token hashes, not a
// token.
func FormatAgentLine(a *AgentIdentity) string {
	var b strings.Builder
	b.WriteString(a.Name)
	b.WriteString(" sha256:")
	b.WriteString(a.TokenSHA256)
	if a.TokenSHA256Next != "" {
		b.WriteString(" sha256:")
		b.WriteString(a.TokenSHA256Next)
	}
	if a.MaxServices > 0 {
		fmt.Fprintf(&b, " max_services=%d", a.MaxServices)
	}
	if a.MaxRetainedPorts > 0 {
		fmt.Fprintf(&b, " max_retained_ports=%d", a.MaxRetainedPorts)
	}
	return b.String()
}

// loadAgentsFile reads g.AgentsFile into g.FileAgents. An agent that is
// also in gateway.yaml's agents is an error: which of the two is meant
// would be a guess.
func (g *GatewayFile) loadAgentsFile() error {
	g.FileAgents = nil
	if g.AgentsFile == "" {
		return nil
	}
	b, err := readFile(g.AgentsFile)
	if err != nil {
		return fmt.Errorf("agents_file: %w", err)
	}
	agents, err := ParseAgentsFile(g.AgentsFile, b)
	if err != nil {
		return err
	}
	inYAML := make(map[string]bool, len(g.Agents))
	for i := range g.Agents {
		inYAML[g.Agents[i].Name] = true
	}
	var errs []error
	for i := range agents {
		if inYAML[agents[i].Name] {
			errs = append(errs, fmt.Errorf("agents_file: %s: agent %q is also in agents of the gateway config; keep it in one of the two", g.AgentsFile, agents[i].Name))
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	g.FileAgents = agents
	return nil
}

// AllAgents returns the agents of gateway.yaml followed by those of the
// agents file. Any other source of identities (a cluster store) would be
// merged here too: everything downstream reads identities only through
// this list.
func (g *GatewayFile) AllAgents() []AgentIdentity {
	if len(g.FileAgents) == 0 {
		return g.Agents
	}
	out := make([]AgentIdentity, 0, len(g.Agents)+len(g.FileAgents))
	out = append(out, g.Agents...)
	return append(out, g.FileAgents...)
}
