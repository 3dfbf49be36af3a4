// Package testmetrics reads Prometheus metrics in tests: from a registry in
// the test process (Gather, Value) or from a /metrics page served over HTTP
// and parsed with the Prometheus text parser, as a Prometheus server would
// (Scrape), and sums the samples of one metric whose labels match (Sum).
// For tests only.
package testmetrics

import (
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// scrapeTimeout is a hang guard for one scrape, not a performance bound.
const scrapeTimeout = 30 * time.Second

// Families are metric families by name, as Gather and Scrape return them.
type Families = map[string]*dto.MetricFamily

// Gather collects g's metric families, failing the test on an error.
func Gather(t testing.TB, g prometheus.Gatherer) Families {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatalf("gathering metrics: %v", err)
	}
	out := make(Families, len(mfs))
	for _, mf := range mfs {
		out[mf.GetName()] = mf
	}
	return out
}

// Scrape fetches a /metrics page over HTTP and parses it with the
// Prometheus text parser, failing the test on an error.
func Scrape(t testing.TB, url string) Families {
	t.Helper()
	c := http.Client{Timeout: scrapeTimeout}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("scraping metrics: %v", err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parsing %s: %v", url, err)
	}
	return mfs
}

// Sum sums the samples of the metric name whose labels include every pair
// of want (all of them when want is empty): counter and gauge values,
// histogram sample counts. A metric that is not there sums to 0.
func Sum(mfs Families, name string, want map[string]string) float64 {
	mf := mfs[name]
	if mf == nil {
		return 0
	}
	var sum float64
	for _, m := range mf.GetMetric() {
		if !hasLabels(m, want) {
			continue
		}
		switch {
		case m.Counter != nil:
			sum += m.Counter.GetValue()
		case m.Gauge != nil:
			sum += m.Gauge.GetValue()
		case m.Histogram != nil:
			sum += float64(m.Histogram.GetSampleCount())
		case m.Untyped != nil:
			sum += m.Untyped.GetValue()
		}
	}
	return sum
}

// Value is Sum over what g gathers now.
func Value(t testing.TB, g prometheus.Gatherer, name string, want map[string]string) float64 {
	t.Helper()
	return Sum(Gather(t, g), name, want)
}

// hasLabels reports whether m carries every label pair of want.
func hasLabels(m *dto.Metric, want map[string]string) bool {
	for k, v := range want {
		found := false
		for _, lp := range m.GetLabel() {
			if lp.GetName() == k && lp.GetValue() == v {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}
