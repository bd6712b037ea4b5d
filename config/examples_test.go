package config

import (
	"bytes"
	"os"
	"regexp"
	"testing"
)

// The example files the package installs as /etc/lvnbd/*.toml.
const (
	exampleServer = "../packaging/server.toml"
	exampleClient = "../packaging/client.toml"
)

// commentedSetting is how the examples comment out a setting or a table:
// "#" directly before it; prose has a space after the "#".
var commentedSetting = regexp.MustCompile(`(?m)^#(\[|[a-z_]+ = )`)

// uncomment turns every commented-out setting of an example on.
func uncomment(doc []byte) []byte {
	return commentedSetting.ReplaceAll(doc, []byte("$1"))
}

func TestExampleServerConfig(t *testing.T) {
	doc, err := os.ReadFile(exampleServer)
	if err != nil {
		t.Fatal(err)
	}
	t.Run("as shipped", func(t *testing.T) {
		c, err := Parse(doc, exampleServer)
		if err != nil {
			t.Fatal(err)
		}
		if d := diff(Default(), c); d != "" {
			t.Errorf("the shipped file is not the defaults (-want +got)\n%s", d)
		}
	})
	t.Run("every setting on", func(t *testing.T) {
		on := uncomment(doc)
		if bytes.Equal(on, doc) {
			t.Fatal("no commented-out settings found")
		}
		c, err := Parse(on, exampleServer+" (uncommented)")
		if err != nil {
			t.Fatalf("%v\n%s", err, on)
		}
		if len(c.Exports) != 2 || c.Server.Volumes != "lvm://vg0" || c.TLS.CA == "" || len(c.VolumeExports.AllowNames) != 2 {
			t.Errorf("uncommented settings missing: %+v", c)
		}
		// Every key of the schema appears in the example, so it documents
		// them all.
		var buf bytes.Buffer
		if err := c.WriteTOML(&buf); err != nil {
			t.Fatal(err)
		}
		for _, t2 := range tableSettings {
			for _, s := range t2.settings {
				if !regexp.MustCompile(`(?m)^#` + s.key + ` = `).Match(doc) {
					t.Errorf("%s.%s is not in the example", t2.table, s.key)
				}
			}
		}
		for _, k := range exportKeys {
			if !regexp.MustCompile(`(?m)^#` + k + ` = `).Match(doc) {
				t.Errorf("export key %s is not in the example", k)
			}
		}
	})
}

func TestExampleClientConfig(t *testing.T) {
	doc, err := os.ReadFile(exampleClient)
	if err != nil {
		t.Fatal(err)
	}
	c, err := ParseClient(doc, exampleClient)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Pairs) != 0 {
		t.Errorf("the shipped file attaches %d pairs; it should only show how", len(c.Pairs))
	}
	on := uncomment(doc)
	c, err = ParseClient(on, exampleClient+" (uncommented)")
	if err != nil {
		t.Fatalf("%v\n%s", err, on)
	}
	if len(c.Pairs) != 1 || c.Pairs[0].Connections != 2 || len(c.Pairs[0].Vdevs) != 2 {
		t.Errorf("uncommented pair = %+v", c.Pairs)
	}
	for _, k := range pairKeys {
		if !regexp.MustCompile(`(?m)^#` + k + ` = `).Match(doc) {
			t.Errorf("pair key %s is not in the example", k)
		}
	}
}
