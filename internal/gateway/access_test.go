package gateway

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
)

// The per-source table stays bounded under a flood of distinct (spoofed)
// sources, and forgets a source once it holds nothing.
func TestSourceTableBounded(t *testing.T) {
	p := &sourcePolicy{rate: 1, burst: 1}
	tab := newSourceTable()
	now := time.Unix(1000, 0)
	admitted := 0
	for i := range maxSources + 1000 {
		a := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		if tab.admit(a, p, now) {
			admitted++
			tab.release(a, p, now)
		}
	}
	if n := tab.size(); n > maxSources {
		t.Fatalf("table holds %d sources, more than %d", n, maxSources)
	}
	if admitted != maxSources {
		t.Errorf("%d sources admitted while the table had room, want %d", admitted, maxSources)
	}
	// A second later every bucket is full again: a sweep frees them all.
	later := now.Add(time.Second)
	if !tab.admit(netip.MustParseAddr("192.0.2.1"), p, later) {
		t.Fatal("a new source was refused after the old entries expired")
	}
	if n := tab.size(); n != 1 {
		t.Errorf("after the sweep the table holds %d sources, want 1", n)
	}
}

// The new-connection rate per source: a burst, then one per 1/rate.
func TestSourceTableRate(t *testing.T) {
	p := &sourcePolicy{rate: 2, burst: 3}
	tab := newSourceTable()
	a := netip.MustParseAddr("127.0.0.7")
	now := time.Unix(1000, 0)
	for i := range 3 {
		if !tab.admit(a, p, now) {
			t.Fatalf("connection %d of the burst refused", i)
		}
		tab.release(a, p, now)
	}
	if tab.admit(a, p, now) {
		t.Fatal("a fourth connection at once got through a burst of 3")
	}
	if !tab.admit(netip.MustParseAddr("127.0.0.8"), p, now) {
		t.Fatal("another source was refused")
	}
	if !tab.admit(a, p, now.Add(500*time.Millisecond)) {
		t.Fatal("no token after 1/rate")
	}
	// max open per source.
	q := &sourcePolicy{maxOpen: 2}
	a = netip.MustParseAddr("127.0.0.9")
	for i := range 2 {
		if !tab.admit(a, q, now) {
			t.Fatalf("open connection %d refused", i+1)
		}
	}
	if tab.admit(a, q, now) {
		t.Fatal("a third open connection got through max 2")
	}
	tab.release(a, q, now)
	if !tab.admit(a, q, now) {
		t.Fatal("refused after a release")
	}
}

// The agent narrows, never widens, the operator's ceiling; the ceiling's
// deny list and the service's lists all apply at accept.
func TestSourcePolicyCeiling(t *testing.T) {
	ceil := &config.Ceiling{
		Allow: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("2001:db8::/32")},
		Deny:  []netip.Prefix{netip.MustParsePrefix("10.9.0.0/16")},
	}
	svc := func(allow, deny []string) *protocol.Service {
		return &protocol.Service{ID: "pg", Protocol: protocol.KindTCP, AllowCIDRs: allow, DenyCIDRs: deny}
	}
	if _, err := checkService(svc([]string{"10.1.0.0/16", "2001:db8:1::/48"}, nil), ceil); err != nil {
		t.Fatalf("a narrower allow list refused: %v", err)
	}
	for _, wide := range []string{"0.0.0.0/0", "10.0.0.0/7", "192.0.2.1", "2001:db9::/32"} {
		_, err := checkService(svc([]string{"10.1.0.0/16", wide}, nil), ceil)
		if err == nil || !strings.Contains(err.Error(), wide) {
			t.Errorf("allow %s: error %v, want one naming it", wide, err)
		}
	}
	for _, bad := range []*protocol.Service{
		svc([]string{"10.0.0.1/8"}, nil),
		svc(nil, []string{"nonsense"}),
		{ID: "dns", Protocol: protocol.KindUDP, ProxyProtocol: "v1"},
		{ID: "pg", Protocol: protocol.KindTCP, ProxyProtocol: "v3"},
		{ID: "pg", Protocol: protocol.KindTCP, MaxConnectionsPerSource: -1},
	} {
		if _, err := checkService(bad, nil); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}

	pol, err := checkService(svc(nil, []string{"10.1.2.3"}), ceil)
	if err != nil {
		t.Fatal(err)
	}
	for src, want := range map[string]bool{
		"10.1.1.1":         true,
		"::ffff:10.1.1.1":  true, // an IPv4 client on a dual-stack listener
		"10.1.2.3":         false,
		"10.9.1.1":         false, // the ceiling's deny list
		"192.0.2.1":        false, // outside the ceiling
		"2001:db8::7":      true,
		"2001:db9::7":      false,
		"::ffff:192.0.2.1": false,
	} {
		if got := pol.allowed(netip.MustParseAddr(src), ceil); got != want {
			t.Errorf("allowed(%s) = %v, want %v", src, got, want)
		}
	}
	if open, _ := checkService(svc(nil, nil), nil); !open.allowed(netip.MustParseAddr("192.0.2.1"), nil) {
		t.Error("no lists and no ceiling must allow every source")
	}
}

// The allow check runs on every accepted connection: it allocates nothing.
func TestSourcePolicyAllocs(t *testing.T) {
	ceil := &config.Ceiling{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}
	pol, err := checkService(&protocol.Service{ID: "x", Protocol: protocol.KindTCP, AllowCIDRs: []string{"127.0.0.7"}, DenyCIDRs: []string{"127.0.0.8"}}, ceil)
	if err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr("127.0.0.7")
	if n := testing.AllocsPerRun(100, func() { pol.allowed(a, ceil) }); n != 0 {
		t.Errorf("allowed allocates %v times per call", n)
	}
}
