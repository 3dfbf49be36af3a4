// Package metrics defines the Prometheus metrics of the agent and the
// gateway. Every set is created against a Registerer passed in (no global
// registry), and the data path never touches Prometheus: connections count
// into their own atomics, which a scrape reads live and which are folded into
// totals when the connection ends.
package metrics

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// PairCounter is a counter with two directions (sent/received, in/out) per
// label set, computed at scrape time from finished flows plus the live
// counters of running ones.
type PairCounter struct {
	desc       *prometheus.Desc
	directions [2]string

	mu   sync.Mutex
	done map[string]*[2]float64 // by joined label values
	vals map[string][]string
	live map[*Flow]struct{}
}

// Flow is one connection or session tracked by a PairCounter.
type Flow struct {
	c    *PairCounter
	key  string
	read func() (int64, int64)
}

// NewPairCounter returns a counter named name with the given variable
// labels plus a "direction" label taking the two given values.
func NewPairCounter(name, help string, labels []string, directions [2]string) *PairCounter {
	return &PairCounter{
		desc:       prometheus.NewDesc(name, help, append(append([]string(nil), labels...), "direction"), nil),
		directions: directions,
		done:       map[string]*[2]float64{},
		vals:       map[string][]string{},
		live:       map[*Flow]struct{}{},
	}
}

func joinKey(vals []string) string {
	n := 0
	for _, v := range vals {
		n += len(v) + 1
	}
	b := make([]byte, 0, n)
	for _, v := range vals {
		b = append(b, v...)
		b = append(b, 0)
	}
	return string(b)
}

// Track starts counting a flow whose counters read returns. Call Done when
// the flow ends.
func (c *PairCounter) Track(read func() (int64, int64), labelValues ...string) *Flow {
	f := &Flow{c: c, key: joinKey(labelValues), read: read}
	c.mu.Lock()
	if _, ok := c.vals[f.key]; !ok {
		c.vals[f.key] = append([]string(nil), labelValues...)
		c.done[f.key] = new([2]float64)
	}
	c.live[f] = struct{}{}
	c.mu.Unlock()
	return f
}

// Done folds the flow's final counts into the totals.
func (f *Flow) Done() {
	a, b := f.read()
	c := f.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.live[f]; !ok {
		return
	}
	delete(c.live, f)
	if d := c.done[f.key]; d != nil {
		d[0] += float64(a)
		d[1] += float64(b)
	}
}

// Add adds to the totals directly (for counts not tied to a flow).
func (c *PairCounter) Add(a, b int64, labelValues ...string) {
	key := joinKey(labelValues)
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.vals[key]; !ok {
		c.vals[key] = append([]string(nil), labelValues...)
		c.done[key] = new([2]float64)
	}
	c.done[key][0] += float64(a)
	c.done[key][1] += float64(b)
}

// Delete forgets a label set with no live flows (a withdrawn service), so
// label cardinality follows the services that exist.
func (c *PairCounter) Delete(labelValues ...string) {
	key := joinKey(labelValues)
	c.mu.Lock()
	defer c.mu.Unlock()
	for f := range c.live {
		if f.key == key {
			return
		}
	}
	delete(c.done, key)
	delete(c.vals, key)
}

// Describe implements prometheus.Collector.
func (c *PairCounter) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

// Collect implements prometheus.Collector.
func (c *PairCounter) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	sums := make(map[string][2]float64, len(c.done))
	for k, d := range c.done {
		sums[k] = *d
	}
	for f := range c.live {
		a, b := f.read()
		s := sums[f.key]
		s[0] += float64(a)
		s[1] += float64(b)
		sums[f.key] = s
	}
	vals := make(map[string][]string, len(c.vals))
	for k, v := range c.vals {
		vals[k] = v
	}
	c.mu.Unlock()
	for k, s := range sums {
		for i, dir := range c.directions {
			lv := append(append([]string(nil), vals[k]...), dir)
			ch <- prometheus.MustNewConstMetric(c.desc, prometheus.CounterValue, s[i], lv...)
		}
	}
}

// Values returns the current totals of one label set (finished plus live).
func (c *PairCounter) Values(labelValues ...string) (float64, float64) {
	key := joinKey(labelValues)
	c.mu.Lock()
	defer c.mu.Unlock()
	var a, b float64
	if d := c.done[key]; d != nil {
		a, b = d[0], d[1]
	}
	for f := range c.live {
		if f.key == key {
			x, y := f.read()
			a += float64(x)
			b += float64(y)
		}
	}
	return a, b
}
