package config

import (
	"encoding"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"reflect"
	"sort"
	"strconv"
	"strings"

	yaml "go.yaml.in/yaml/v3"
)

// The YAML is decoded by sigs.k8s.io/yaml, which turns it into JSON first
// and so loses every line number and stops at the first unknown key. Before
// that decode, checkShape walks the YAML's node tree beside the Go type it is
// meant for and reports, with the line of each, every unknown key (with the
// nearest known one when it is a likely typo) and every value of the wrong
// kind, all at once. A document checkShape cannot parse is left to the
// decoder, whose error is then the one reported.

// maxCheckedNodes bounds the walk: aliases can make a small document name
// a great many nodes.
const maxCheckedNodes = 100000

// shapeChecker collects the problems of one document.
type shapeChecker struct {
	name     string // file name, or "" for a document without one
	problems []error
	lines    map[string]int // key path → line, for validation errors
	budget   int
}

// checkShape reports the unknown keys and wrongly typed values of data
// against v's type, each prefixed with name:line. It returns the key path →
// line index as well, so that later validation errors can name lines too.
func checkShape(name string, data []byte, v any) (map[string]int, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, nil // the decoder reports it
	}
	c := &shapeChecker{name: name, lines: map[string]int{}, budget: maxCheckedNodes}
	if doc.Kind == yaml.DocumentNode && len(doc.Content) > 0 {
		c.walk(doc.Content[0], reflect.TypeOf(v), "", 0)
	}
	return c.lines, errors.Join(c.problems...)
}

// at is the "name:line: " prefix of a problem at line (0: unknown).
func (c *shapeChecker) at(line int) string {
	switch {
	case c.name != "" && line > 0:
		return fmt.Sprintf("%s:%d: ", c.name, line)
	case c.name != "":
		return c.name + ": "
	case line > 0:
		return fmt.Sprintf("line %d: ", line)
	}
	return ""
}

func (c *shapeChecker) add(line int, key, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if key != "" {
		msg = key + ": " + msg
	}
	c.problems = append(c.problems, errors.New(c.at(line)+msg))
}

var (
	jsonUnmarshaler = reflect.TypeOf((*json.Unmarshaler)(nil)).Elem()
	textUnmarshaler = reflect.TypeOf((*encoding.TextUnmarshaler)(nil)).Elem()
)

// walk checks node n against type t at key path key.
func (c *shapeChecker) walk(n *yaml.Node, t reflect.Type, key string, depth int) {
	c.budget--
	if c.budget < 0 || depth > 100 {
		return
	}
	for n.Kind == yaml.AliasNode {
		if n.Alias == nil {
			return
		}
		n = n.Alias
	}
	if key != "" {
		if _, ok := c.lines[key]; !ok {
			c.lines[key] = n.Line
		}
	}
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" {
		return // null leaves the default
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	// Types that decode themselves (durations) check their own values.
	if reflect.PointerTo(t).Implements(jsonUnmarshaler) || reflect.PointerTo(t).Implements(textUnmarshaler) {
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			c.add(n.Line, key, "want a map of keys, got %s", describe(n))
			return
		}
		c.walkStruct(n, t, key, depth)
	case reflect.Slice, reflect.Array:
		if n.Kind != yaml.SequenceNode {
			c.add(n.Line, key, "want a list, got %s", describe(n))
			return
		}
		for i, e := range n.Content {
			c.walk(e, t.Elem(), fmt.Sprintf("%s[%d]", key, i), depth+1)
		}
	case reflect.String:
		if n.Kind != yaml.ScalarNode {
			c.add(n.Line, key, "want a string, got %s", describe(n))
		}
	case reflect.Bool:
		if n.Kind != yaml.ScalarNode || !isYAMLBool(n) {
			c.add(n.Line, key, "want true or false, got %s", describe(n))
		}
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		switch {
		case n.Kind == yaml.ScalarNode && n.ShortTag() == "!!float" && !isWholeNumber(n):
			c.add(n.Line, key, "want a whole number, got %s", describe(n))
		case n.Kind != yaml.ScalarNode || !isWholeNumber(n):
			c.add(n.Line, key, "want a number, got %s", describe(n))
		}
	case reflect.Float32, reflect.Float64:
		if n.Kind != yaml.ScalarNode || (n.ShortTag() != "!!int" && n.ShortTag() != "!!float") {
			c.add(n.Line, key, "want a number, got %s", describe(n))
		}
	}
}

// walkStruct checks a mapping against struct type t: every key must be one
// of t's JSON field names.
func (c *shapeChecker) walkStruct(n *yaml.Node, t reflect.Type, key string, depth int) {
	fields := jsonFields(t)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, val := n.Content[i], n.Content[i+1]
		if k.Kind == yaml.ScalarNode && k.Value == "<<" && k.ShortTag() == "!!merge" {
			// A merge key: the merged maps' keys count as this map's.
			c.walk(val, mergeType(val, t), key, depth+1)
			continue
		}
		if k.Kind != yaml.ScalarNode {
			c.add(k.Line, key, "a key must be a plain name, got %s", describe(k))
			continue
		}
		f, ok := fields[k.Value]
		if !ok {
			msg := fmt.Sprintf("unknown key %q", k.Value)
			if s := nearest(k.Value, fields); s != "" {
				msg += fmt.Sprintf(" (did you mean %q?)", s)
			}
			c.add(k.Line, key, "%s", msg)
			continue
		}
		c.walk(val, f, joinKey(key, k.Value), depth+1)
	}
}

// mergeType is the type a merge key's value is checked against: t for a
// map, a list of t for a list of maps.
func mergeType(val *yaml.Node, t reflect.Type) reflect.Type {
	if val.Kind == yaml.SequenceNode {
		return reflect.SliceOf(t)
	}
	return t
}

func joinKey(parent, k string) string {
	if parent == "" {
		return k
	}
	return parent + "." + k
}

// jsonFields maps the JSON names of t's exported fields to their types.
func jsonFields(t reflect.Type) map[string]reflect.Type {
	m := map[string]reflect.Type{}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" {
			continue
		}
		if name == "" && f.Anonymous && f.Type.Kind() == reflect.Struct {
			// An embedded struct's keys are the outer map's, as for
			// encoding/json.
			for k, v := range jsonFields(f.Type) {
				m[k] = v
			}
			continue
		}
		if name == "" {
			name = f.Name
		}
		m[name] = f.Type
	}
	return m
}

// describe names what a node holds, for "want X, got Y".
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a map"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		return strconv.Quote(n.Value)
	}
	return "something else"
}

// isYAMLBool reports whether the decoder (YAML 1.1 rules) reads n as a
// boolean.
func isYAMLBool(n *yaml.Node) bool {
	if n.ShortTag() == "!!bool" {
		return true
	}
	if n.Style&(yaml.SingleQuotedStyle|yaml.DoubleQuotedStyle) != 0 {
		return false
	}
	switch n.Value {
	case "y", "Y", "yes", "Yes", "YES", "on", "On", "ON",
		"n", "N", "no", "No", "NO", "off", "Off", "OFF":
		return true
	}
	return false
}

// isWholeNumber reports whether n is an integer, or a float with no
// fraction.
func isWholeNumber(n *yaml.Node) bool {
	switch n.ShortTag() {
	case "!!int":
		return true
	case "!!float":
		f, err := strconv.ParseFloat(n.Value, 64)
		return err == nil && f == math.Trunc(f) && !math.IsInf(f, 0)
	}
	return false
}

// nearest returns the known key closest to k when it is near enough to be
// a typo of it, else "".
func nearest(k string, known map[string]reflect.Type) string {
	names := make([]string, 0, len(known))
	for n := range known {
		names = append(names, n)
	}
	sort.Strings(names)
	best, bestD := "", 0
	limit := 2
	if len(k) <= 4 {
		limit = 1
	}
	lk := strings.ToLower(strings.ReplaceAll(k, "-", "_"))
	for _, n := range names {
		d := editDistance(lk, n)
		if d <= limit && (best == "" || d < bestD) {
			best, bestD = n, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance between a and b, with a swap of
// two neighbours counting as one edit.
func editDistance(a, b string) int {
	if len(a) > 64 || len(b) > 64 {
		return math.MaxInt32
	}
	prev2 := make([]int, len(b)+1)
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				cur[j] = min(cur[j], prev2[j-2]+1)
			}
		}
		prev2, prev, cur = prev, cur, prev2
	}
	return prev[len(b)]
}

// withLines prefixes each validation problem (each "key: message") with the
// position of its key, when the document named that key.
func withLines(name string, lines map[string]int, err error) error {
	if err == nil {
		return nil
	}
	var list []error
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		list = j.Unwrap()
	} else {
		list = []error{err}
	}
	out := make([]error, 0, len(list))
	c := &shapeChecker{name: name}
	for _, e := range list {
		key, _, _ := strings.Cut(e.Error(), ": ")
		line, ok := lines[key]
		if !ok {
			// "services[0].port" may be absent while "services[0]" is not
			// (a list entry not in the file, from a flag, has no line).
			for k := key; k != "" && !ok; {
				i := strings.LastIndexByte(k, '.')
				if i < 0 {
					break
				}
				k = k[:i]
				line, ok = lines[k]
			}
		}
		if !ok && name == "" {
			out = append(out, e)
			continue
		}
		out = append(out, fmt.Errorf("%s%w", c.at(line), e))
	}
	return errors.Join(out...)
}
