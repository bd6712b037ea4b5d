package config

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
	"github.com/pelletier/go-toml/v2/unstable"

	"github.com/lvnbd/lvnbd/volume"
)

// positions maps key paths ("server.listen", "export[1].allow[0]") to the
// line they are written on. go-toml's decoder gives lines only for syntax
// errors, so the document is parsed a second time with its low-level parser
// for these.
type positions map[string]int

// line is the line of key, or of its nearest parent written in the file
// (a key inside an inline table has no line of its own in the index); 0 when
// nothing is known.
func (p positions) line(key string) int {
	for key != "" {
		if l, ok := p[key]; ok {
			return l
		}
		i := strings.LastIndexAny(key, ".[")
		if i < 0 {
			break
		}
		key = key[:i]
	}
	return 0
}

// scanPositions indexes where every key of doc is written. It also returns
// the error of a key or table defined twice, which go-toml reports without a
// line.
func scanPositions(doc []byte) (positions, *Error) {
	pos := positions{}
	var p unstable.Parser
	p.Reset(doc)
	var (
		table    string             // the current [table] or [[array table]] path, with its index
		arrays   = map[string]int{} // [[array table]] path -> entries so far
		defined  = map[string]bool{}
		headers  = map[string]bool{}
		firstErr *Error
	)
	lineOf := func(n *unstable.Node) int {
		if n == nil || n.Raw.Length == 0 {
			return 0
		}
		return p.Shape(n.Raw).Start.Line
	}
	for p.NextExpression() {
		e := p.Expression()
		switch e.Kind {
		case unstable.Table, unstable.ArrayTable:
			it := e.Key()
			path, first := keyPath(&it)
			line := lineOf(first)
			if e.Kind == unstable.ArrayTable {
				n := arrays[path]
				arrays[path] = n + 1
				path = fmt.Sprintf("%s[%d]", path, n)
			} else if headers[path] && firstErr == nil {
				firstErr = &Error{Line: line, Key: path, Msg: fmt.Sprintf("[%s] is defined twice: merge the two tables", path)}
			}
			headers[path] = true
			table = path
			if _, ok := pos[path]; !ok {
				pos[path] = line
			}
		case unstable.KeyValue:
			it := e.Key()
			key, first := keyPath(&it)
			path := joinKey(table, key)
			line := lineOf(first)
			if defined[path] && firstErr == nil {
				firstErr = &Error{Line: line, Key: path, Msg: "set twice: keep one of the two lines"}
			}
			defined[path] = true
			pos[path] = line
			indexValue(pos, path, e.Value(), lineOf)
		}
	}
	return pos, firstErr
}

// indexValue records the lines of the elements of arrays and inline tables.
func indexValue(pos positions, path string, v *unstable.Node, lineOf func(*unstable.Node) int) {
	switch v.Kind {
	case unstable.Array:
		it := v.Children()
		for i := 0; it.Next(); i++ {
			elem := fmt.Sprintf("%s[%d]", path, i)
			if l := lineOf(it.Node()); l > 0 {
				pos[elem] = l
			}
			indexValue(pos, elem, it.Node(), lineOf)
		}
	case unstable.InlineTable:
		it := v.Children()
		for it.Next() {
			kv := it.Node()
			if kv.Kind != unstable.KeyValue {
				continue
			}
			kit := kv.Key()
			key, first := keyPath(&kit)
			sub := joinKey(path, key)
			if l := lineOf(first); l > 0 {
				pos[sub] = l
			}
			indexValue(pos, sub, kv.Value(), lineOf)
		}
	}
}

// keyPath joins the parts of a (possibly dotted) key and returns its first
// part's node, which carries the position.
func keyPath(it *unstable.Iterator) (string, *unstable.Node) {
	var parts []string
	var first *unstable.Node
	for it.Next() {
		if first == nil {
			first = it.Node()
		}
		parts = append(parts, quoteKey(string(it.Node().Data)))
	}
	return strings.Join(parts, "."), first
}

func joinKey(table, key string) string {
	if table == "" {
		return key
	}
	return table + "." + key
}

// quoteKey writes a key part as TOML would need it, so that an error about
// an odd key shows it unambiguously.
func quoteKey(k string) string {
	if k == "" {
		return `""`
	}
	for _, r := range k {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return strconv.Quote(k)
		}
	}
	return k
}

// decodeDocument parses TOML into a generic tree plus the line index, and
// turns go-toml's errors into *Error with a line wherever one can be found.
func decodeDocument(doc []byte, file string) (map[string]any, positions, error) {
	var tree map[string]any
	err := toml.Unmarshal(doc, &tree)
	if err == nil {
		pos, _ := scanPositions(doc)
		if tree == nil {
			tree = map[string]any{}
		}
		return tree, pos, nil
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		line, col := de.Position()
		return nil, nil, &Error{File: file, Line: line, Column: col,
			Msg: "TOML syntax: " + strings.TrimPrefix(de.Error(), "toml: ") + " (see https://toml.io for how to write it)"}
	}
	if _, dup := scanPositions(doc); dup != nil {
		dup.File = file
		return nil, nil, dup
	}
	return nil, nil, &Error{File: file, Msg: "TOML: " + strings.TrimPrefix(err.Error(), "toml: ") + " (see https://toml.io for how to write it)"}
}

// reader walks a decoded document against the schema, converting values and
// reporting every unknown key and every value of the wrong type.
type reader struct {
	*problems
}

// table checks that m has only the keys in known, naming the unknown ones
// with a suggestion.
func (r reader) table(m map[string]any, path string, known []string) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if slices.Contains(known, k) {
			continue
		}
		what := "the top level"
		if path != "" {
			what = "[" + tableName(path) + "]"
		}
		msg := fmt.Sprintf("unknown key; %s takes %s", what, strings.Join(known, ", "))
		if s := suggest(k, known); s != "" {
			msg = fmt.Sprintf("unknown key: did you mean %s? (%s takes %s)", s, what, strings.Join(known, ", "))
		}
		r.add(joinKey(path, quoteKey(k)), "%s", msg)
	}
}

// tableName is how the file spells a table path: export[2] is one of the
// [[export]] tables.
func tableName(path string) string {
	if i := strings.IndexByte(path, '['); i >= 0 && strings.HasSuffix(path, "]") && !strings.Contains(path[i:], ".") {
		return "[" + path[:i] + "]"
	}
	return path
}

// subtable returns m[key] as a table, reporting a value of another type.
func (r reader) subtable(m map[string]any, parent, key string) (map[string]any, bool) {
	v, ok := m[key]
	if !ok {
		return nil, false
	}
	t, ok := v.(map[string]any)
	if !ok {
		r.add(joinKey(parent, key), "want a table: write [%s] on a line of its own, then its keys", joinKey(parent, key))
		return nil, false
	}
	return t, true
}

// tables returns m[key] as an array of tables ([[key]]).
func (r reader) tables(m map[string]any, key string) []map[string]any {
	v, ok := m[key]
	if !ok {
		return nil
	}
	list, ok := v.([]any)
	if !ok {
		r.add(key, "want one [[%s]] table per entry", key)
		return nil
	}
	out := make([]map[string]any, 0, len(list))
	for i, e := range list {
		t, ok := e.(map[string]any)
		if !ok {
			r.add(fmt.Sprintf("%s[%d]", key, i), "want a table: write each entry as [[%s]] followed by its keys", key)
			continue
		}
		out = append(out, t)
	}
	return out
}

// value converts m[key], if present, into the variable dst points to, whose
// type says what the key holds. It reports whether the key was present and
// well-typed.
func (r reader) value(m map[string]any, path, key string, dst any) bool {
	v, ok := m[key]
	if !ok {
		return false
	}
	full := joinKey(path, key)
	if err := setFromTOML(dst, v); err != nil {
		r.add(full, "%v", err)
		return false
	}
	return true
}

// setFromTOML stores a decoded TOML value into dst, which is one of the types
// the schema uses.
func setFromTOML(dst any, v any) error {
	switch d := dst.(type) {
	case *string:
		s, ok := v.(string)
		if !ok {
			return fmt.Errorf("want a string in quotes, not %s", describe(v))
		}
		*d = s
	case *bool:
		b, ok := v.(bool)
		if !ok {
			return fmt.Errorf("want true or false, not %s", describe(v))
		}
		*d = b
	case *int:
		n, ok := v.(int64)
		if !ok {
			return fmt.Errorf("want a whole number such as 64, not %s", describe(v))
		}
		if n < math.MinInt32 || n > math.MaxInt32 {
			return fmt.Errorf("%d is out of range: want at most %d", n, math.MaxInt32)
		}
		*d = int(n)
	case *time.Duration:
		s, ok := v.(string)
		if !ok {
			return fmt.Errorf("want a duration in quotes such as \"30s\" or \"2m\", not %s", describe(v))
		}
		return parseDuration(d, s)
	case *size:
		switch x := v.(type) {
		case string:
			return parseSize(d, x)
		case int64:
			if x <= 0 {
				return fmt.Errorf("%d: want a size more than zero, such as \"128MiB\"", x)
			}
			*d = size(x)
		default:
			return fmt.Errorf("want a size in quotes such as \"128MiB\", or a number of bytes, not %s", describe(v))
		}
	case *[]string:
		list, ok := v.([]any)
		if !ok {
			if s, isStr := v.(string); isStr {
				return fmt.Errorf("want a list: write [%q]", s)
			}
			return fmt.Errorf("want a list of strings such as [\"a\", \"b\"], not %s", describe(v))
		}
		out := make([]string, 0, len(list))
		for i, e := range list {
			s, ok := e.(string)
			if !ok {
				return fmt.Errorf("element %d: want a string in quotes, not %s", i, describe(e))
			}
			out = append(out, s)
		}
		*d = out
	default:
		panic(fmt.Sprintf("config: no TOML conversion to %T", dst)) // a schema bug, not input
	}
	return nil
}

// setFromString stores a command-line flag's value into dst.
func setFromString(dst any, s string) error {
	switch d := dst.(type) {
	case *string:
		*d = s
	case *bool:
		b, err := strconv.ParseBool(s)
		if err != nil {
			return fmt.Errorf("%q: want true or false", s)
		}
		*d = b
	case *int:
		n, err := strconv.ParseInt(s, 10, 32)
		if err != nil {
			return fmt.Errorf("%q: want a whole number", s)
		}
		*d = int(n)
	case *time.Duration:
		return parseDuration(d, s)
	case *size:
		return parseSize(d, s)
	default:
		panic(fmt.Sprintf("config: no flag conversion to %T", dst))
	}
	return nil
}

func parseDuration(d *time.Duration, s string) error {
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is not a duration: write a number and a unit, such as \"30s\", \"500ms\" or \"2m\"", s)
	}
	if v < 0 {
		return fmt.Errorf("%q is negative: want a duration of zero or more, such as \"30s\"", s)
	}
	*d = v
	return nil
}

// size is a byte count; it has its own type so that the schema knows to
// read "128MiB".
type size int64

func parseSize(d *size, s string) error {
	// A plain number of bytes is read exactly; go-humanize goes through a
	// float64.
	if n, err := strconv.ParseInt(s, 10, 64); err == nil && n > 0 {
		*d = size(n)
		return nil
	}
	n, err := volume.ParseSize(s)
	if err != nil {
		return fmt.Errorf("%q is not a size: write a number and a unit, such as \"128MiB\" or \"1GiB\"", s)
	}
	*d = size(n)
	return nil
}

// formatSize writes n exactly, in the largest binary unit that divides it,
// so that reading it back gives n.
func formatSize(n int64) string {
	units := []string{"EiB", "PiB", "TiB", "GiB", "MiB", "KiB"}
	for i, u := range units {
		unit := int64(1) << (10 * (len(units) - i))
		if n >= unit && n%unit == 0 {
			return strconv.FormatInt(n/unit, 10) + u
		}
	}
	return strconv.FormatInt(n, 10)
}

// describe names a decoded TOML value's type for error messages.
func describe(v any) string {
	switch x := v.(type) {
	case string:
		return fmt.Sprintf("the string %q", x)
	case int64:
		return fmt.Sprintf("the number %d", x)
	case float64:
		return fmt.Sprintf("the number %v", x)
	case bool:
		return fmt.Sprintf("%v", x)
	case []any:
		return "a list"
	case map[string]any:
		return "a table"
	default:
		return "a date or time"
	}
}

// suggest returns the known key closest to k when it is a likely typo.
func suggest(k string, known []string) string {
	best, bestDist := "", 3
	for _, c := range known {
		if d := editDistance(strings.ToLower(k), c); d < bestDist {
			best, bestDist = c, d
		}
	}
	return best
}

func editDistance(a, b string) int {
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
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
