package testmetrics

import (
	"net/http/httptest"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

func registry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "services"}, []string{"protocol", "mode"})
	c := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "syncs_total"}, []string{"result"})
	h := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "latency_seconds"})
	reg.MustRegister(g, c, h)
	g.WithLabelValues("tcp", "yamux").Set(2)
	g.WithLabelValues("tcp", "json").Set(3)
	g.WithLabelValues("udp", "json").Set(5)
	c.WithLabelValues("ok").Add(7)
	c.WithLabelValues("error").Add(1)
	h.Observe(0.1)
	h.Observe(0.2)
	return reg
}

func check(t *testing.T, mfs Families) {
	t.Helper()
	for _, c := range []struct {
		name string
		want map[string]string
		sum  float64
	}{
		{"services", nil, 10},
		{"services", map[string]string{"protocol": "tcp"}, 5},
		{"services", map[string]string{"protocol": "tcp", "mode": "json"}, 3},
		{"services", map[string]string{"protocol": "sctp"}, 0},
		{"services", map[string]string{"no_such_label": "x"}, 0},
		{"syncs_total", map[string]string{"result": "error"}, 1},
		{"syncs_total", nil, 8},
		{"latency_seconds", nil, 2},
		{"absent", nil, 0},
	} {
		if got := Sum(mfs, c.name, c.want); got != c.sum {
			t.Errorf("Sum(%s, %v) = %v, want %v", c.name, c.want, got, c.sum)
		}
	}
}

func TestSumOfGathered(t *testing.T) {
	reg := registry()
	check(t, Gather(t, reg))
	if got := Value(t, reg, "services", map[string]string{"mode": "json"}); got != 8 {
		t.Errorf("Value(services{mode=json}) = %v, want 8", got)
	}
}

func TestSumOfScraped(t *testing.T) {
	srv := httptest.NewServer(promhttp.HandlerFor(registry(), promhttp.HandlerOpts{}))
	defer srv.Close()
	check(t, Scrape(t, srv.URL))
}
