package config

import (
	"fmt"
	"math"
	"net/netip"
	"strings"
)

// Client identity and access control: the keys shared by the agent's
// services (and route annotations), the gateway's per-agent ceiling and the
// gateway's proxy_protocol_from.

// PROXY protocol modes of a service: the header the agent writes to the
// backend.
const (
	ProxyProtocolOff = ""
	ProxyProtocolV1  = "v1"
	ProxyProtocolV2  = "v2"
)

// MaxCIDRs bounds each allow or deny list: the check runs on every
// accepted connection, so it stays a short scan.
const MaxCIDRs = 256

// Per-source limits' bounds.
const (
	MaxConnectionsPerSourceLimit = 1 << 20
	MaxConnectionRateLimit       = 1e6
)

// SourcePolicy is what a service says about its clients' sources: who may
// connect, and how much each source may open. Its zero value allows every
// source without limit.
type SourcePolicy struct {
	// AllowCIDRs, when not empty, are the only sources let in.
	AllowCIDRs []string `json:"allow_cidrs,omitempty"`
	// DenyCIDRs are refused even when allowed.
	DenyCIDRs []string `json:"deny_cidrs,omitempty"`
	// MaxConnectionsPerSource bounds one source address's open
	// connections (TCP) or sessions (UDP) to the service; 0: no limit.
	MaxConnectionsPerSource int `json:"max_connections_per_source,omitempty"`
	// MaxConnectionRatePerSource bounds one source address's new
	// connections (or UDP sessions) per second; 0: no limit.
	MaxConnectionRatePerSource float64 `json:"max_connection_rate_per_source,omitempty"`
	// ConnectionBurstPerSource is how many new connections a source may
	// open at once before the rate applies; 0: the rate, rounded up.
	ConnectionBurstPerSource int `json:"connection_burst_per_source,omitempty"`
}

// validate reports the policy's problems under key (services[i], for
// one).
func (s *SourcePolicy) validate(p *problems, key string) {
	if _, err := ParseCIDRs(s.AllowCIDRs); err != nil {
		p.add(key+".allow_cidrs", "%v", err)
	}
	if _, err := ParseCIDRs(s.DenyCIDRs); err != nil {
		p.add(key+".deny_cidrs", "%v", err)
	}
	if err := s.CheckLimits(); err != nil {
		p.add(key+"."+err.Key, "%s", err.Problem)
	}
}

// LimitError is a per-source limit's problem and the key it concerns.
type LimitError struct{ Key, Problem string }

func (e *LimitError) Error() string { return e.Key + ": " + e.Problem }

// CheckLimits checks the per-source limits' ranges.
func (s *SourcePolicy) CheckLimits() *LimitError {
	if v := s.MaxConnectionsPerSource; v < 0 || v > MaxConnectionsPerSourceLimit {
		return &LimitError{"max_connections_per_source", fmt.Sprintf("%d is outside 0-%d", v, MaxConnectionsPerSourceLimit)}
	}
	if v := s.MaxConnectionRatePerSource; math.IsNaN(v) || v < 0 || v > MaxConnectionRateLimit {
		return &LimitError{"max_connection_rate_per_source", fmt.Sprintf("%v is outside 0-%v (new connections per second)", v, MaxConnectionRateLimit)}
	}
	if v := s.ConnectionBurstPerSource; v < 0 || v > MaxConnectionsPerSourceLimit {
		return &LimitError{"connection_burst_per_source", fmt.Sprintf("%d is outside 0-%d", v, MaxConnectionsPerSourceLimit)}
	}
	if s.ConnectionBurstPerSource != 0 && s.MaxConnectionRatePerSource == 0 {
		return &LimitError{"connection_burst_per_source", "is set without max_connection_rate_per_source"}
	}
	return nil
}

// Burst returns the per-source burst: connection_burst_per_source, or the
// rate rounded up (at least 1).
func (s *SourcePolicy) Burst() int {
	if s.ConnectionBurstPerSource > 0 {
		return s.ConnectionBurstPerSource
	}
	return max(1, int(math.Ceil(s.MaxConnectionRatePerSource)))
}

// ParseCIDRs parses a list of CIDRs ("10.0.0.0/8", "2001:db8::/32") or
// single addresses ("192.0.2.7", taken as /32 or /128). A prefix with host
// bits set ("10.0.0.1/8") is refused: it is almost always a typo for a
// narrower or a wider range, and the two differ in who gets in. IPv4-mapped
// IPv6 prefixes are taken as IPv4.
func ParseCIDRs(vs []string) ([]netip.Prefix, error) {
	if len(vs) > MaxCIDRs {
		return nil, fmt.Errorf("%d entries, more than %d", len(vs), MaxCIDRs)
	}
	out := make([]netip.Prefix, 0, len(vs))
	for _, v := range vs {
		pf, err := ParseCIDR(v)
		if err != nil {
			return nil, err
		}
		out = append(out, pf)
	}
	return out, nil
}

// ParseCIDR parses one entry of an allow or deny list; see ParseCIDRs.
func ParseCIDR(v string) (netip.Prefix, error) {
	v = strings.TrimSpace(v)
	if !strings.Contains(v, "/") {
		a, err := netip.ParseAddr(v)
		if err != nil || a.Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("%q is neither a CIDR (10.0.0.0/8) nor an IP address", v)
		}
		a = a.Unmap()
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	pf, err := netip.ParsePrefix(v)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not a CIDR (like 10.0.0.0/8 or 2001:db8::/32)", v)
	}
	if pf.Addr().Is4In6() && pf.Bits() >= 96 {
		pf = netip.PrefixFrom(pf.Addr().Unmap(), pf.Bits()-96)
	}
	if m := pf.Masked(); m != pf {
		return netip.Prefix{}, fmt.Errorf("%q has host bits set (did you mean %s?)", v, m)
	}
	return pf, nil
}

// ContainsAddr reports whether a (unmapped) is in one of the prefixes.
func ContainsAddr(pfs []netip.Prefix, a netip.Addr) bool {
	a = a.Unmap()
	for _, pf := range pfs {
		if pf.Contains(a) {
			return true
		}
	}
	return false
}

// PrefixWithin reports whether every address of pf is in one of outer.
func PrefixWithin(pf netip.Prefix, outer []netip.Prefix) bool {
	for _, o := range outer {
		if o.Bits() <= pf.Bits() && o.Contains(pf.Addr()) {
			return true
		}
	}
	return false
}

// Ceiling is an agent identity's gateway-wide source ceiling, parsed:
// what the operator allows every service of the agent at most.
type Ceiling struct {
	Allow, Deny []netip.Prefix
}

// Ceiling returns the ceiling of the agent called name (nil when it has
// none). It reads what Validate parsed.
func (g *GatewayFile) Ceiling(name string) *Ceiling {
	return g.ceilings[name]
}

// ProxyProtocolFromAddr reports whether a connection from a must start
// with a PROXY protocol header (its source is in proxy_protocol_from).
func (g *GatewayFile) ProxyProtocolFromAddr(a netip.Addr) bool {
	return len(g.proxyFrom) > 0 && ContainsAddr(g.proxyFrom, a)
}

// validateAccess checks proxy_protocol_from and the agents' ceilings, and
// keeps their parsed forms for Ceiling and ProxyProtocolFromAddr.
func (g *GatewayFile) validateAccess(p *problems) {
	pfs, err := ParseCIDRs(g.ProxyProtocolFrom)
	if err != nil {
		p.add("proxy_protocol_from", "%v", err)
	}
	g.proxyFrom = pfs
	g.ceilings = map[string]*Ceiling{}
	for i := range g.Agents {
		a := &g.Agents[i]
		key := fmt.Sprintf("agents[%d]", i)
		allow, err := ParseCIDRs(a.AllowCIDRs)
		if err != nil {
			p.add(key+".allow_cidrs", "%v", err)
		}
		deny, err := ParseCIDRs(a.DenyCIDRs)
		if err != nil {
			p.add(key+".deny_cidrs", "%v", err)
		}
		if len(allow) > 0 || len(deny) > 0 {
			g.ceilings[a.Name] = &Ceiling{Allow: allow, Deny: deny}
		}
	}
}

// validateProxyProtocol checks a service's proxy_protocol for protocol
// kind ("tcp" or "udp") under key.
func validateProxyProtocol(p *problems, key, mode, kind string) {
	switch mode {
	case ProxyProtocolOff, ProxyProtocolV2:
	case ProxyProtocolV1:
		if kind == "udp" {
			p.add(key, "v1 has no datagram form: use v2 for a UDP service")
		}
	default:
		p.add(key, "%q is not v1 or v2 (or empty for none)", mode)
	}
}
