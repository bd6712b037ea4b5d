package config

import (
	"bytes"
	"os"
	"testing"
)

// seedDocs adds the table tests' documents and the example files.
func seedDocs(f *testing.F, docs ...string) {
	for _, d := range docs {
		f.Add([]byte(d))
	}
	for _, name := range []string{exampleServer, exampleClient} {
		if b, err := os.ReadFile(name); err == nil {
			f.Add(b)
			f.Add(uncomment(b))
		}
	}
}

// FuzzParse: no document panics the parser, every error is a *Error that
// says how to fix it, and whatever parses prints and parses back equal.
func FuzzParse(f *testing.F) {
	var docs []string
	for _, tt := range validServer {
		docs = append(docs, tt.doc)
	}
	for _, tt := range invalidServer {
		docs = append(docs, tt.doc)
	}
	seedDocs(f, append(docs, fileWithExports)...)
	f.Fuzz(func(t *testing.T, doc []byte) {
		c, err := Parse(doc, "fuzz.toml")
		if err != nil {
			problemsOf(t, err)
			return
		}
		for _, cfg := range []*Config{c, c.Effective()} {
			var buf bytes.Buffer
			if err := cfg.WriteTOML(&buf); err != nil {
				t.Fatalf("WriteTOML: %v", err)
			}
			back, err := Parse(buf.Bytes(), "printed")
			if err != nil {
				t.Fatalf("printed configuration does not parse: %v\n%s", err, buf.String())
			}
			if d := diff(cfg, back); d != "" {
				t.Fatalf("round trip (-printed +parsed)\n%s", d)
			}
		}
	})
}

// FuzzParseClient is FuzzParse for client.toml.
func FuzzParseClient(f *testing.F) {
	var docs []string
	for _, tt := range validClient {
		docs = append(docs, tt.doc)
	}
	for _, tt := range invalidClient {
		docs = append(docs, tt.doc)
	}
	seedDocs(f, docs...)
	f.Fuzz(func(t *testing.T, doc []byte) {
		c, err := ParseClient(doc, "fuzz.toml")
		if err != nil {
			problemsOf(t, err)
			return
		}
		var buf bytes.Buffer
		if err := c.WriteTOML(&buf); err != nil {
			t.Fatalf("WriteTOML: %v", err)
		}
		back, err := ParseClient(buf.Bytes(), "printed")
		if err != nil {
			t.Fatalf("printed configuration does not parse: %v\n%s", err, buf.String())
		}
		if d := diff(c, back); d != "" {
			t.Fatalf("round trip (-printed +parsed)\n%s", d)
		}
	})
}
