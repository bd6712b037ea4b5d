package config

import (
	"errors"
	"fmt"

	"github.com/spf13/pflag"

	"github.com/lvnbd/lvnbd/server"
)

// ApplyFlags overrides the configuration with the flags of lvnbd serve that
// were given on the command line (pflag's Changed); flags left at their
// defaults do not touch the file's values. Flags fs does not define are
// skipped, so serve may gain them one at a time.
//
// Each [server], [log], [tls] and [metrics] key has the flag of the same
// name (server.max_inflight_bytes is --max-inflight-bytes, log.level is
// --log-level, tls.cert is --tls-cert, tls.default is --tls,
// metrics.listen is --metrics-listen). The flags that act on every export
// replace the file's export settings rather than add to them:
//   - --export NAME=PATH[:ro] replaces the [[export]] tables;
//   - --tls sets tls.default and drops the exports' own tls;
//   - --allow and --allow-name replace the allow and allow_names of
//     [volume_exports] and of every export.
//
// The result is validated as a whole.
func (c *Config) ApplyFlags(fs *pflag.FlagSet) error {
	var errs []error
	changed := func(name string) (*pflag.Flag, bool) {
		f := fs.Lookup(name)
		return f, f != nil && f.Changed
	}
	for _, t := range tableSettings {
		for _, s := range t.settings {
			f, ok := changed(s.flag)
			if !ok {
				continue
			}
			var err error
			if list, isList := s.ref(c).(*[]string); isList {
				*list, err = flagStrings(f)
			} else {
				err = setFromString(s.ref(c), f.Value.String())
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("--%s: %w", f.Name, err))
			}
		}
	}
	if f, ok := changed("export"); ok {
		specs, err := flagStrings(f)
		if err != nil {
			errs = append(errs, fmt.Errorf("--export: %w", err))
		}
		c.Exports = nil
		for _, spec := range specs {
			s, err := server.ParseExportSpec(spec)
			if err != nil {
				errs = append(errs, fmt.Errorf("--export: %w", err))
				continue
			}
			c.Exports = append(c.Exports, Export{Name: s.Name, Path: s.Path, ReadOnly: s.ReadOnly})
		}
	}
	if _, ok := changed("tls"); ok {
		c.VolumeExports.TLS = ""
		for i := range c.Exports {
			c.Exports[i].TLS = ""
		}
	}
	for _, a := range []struct {
		flag string
		ref  func(*Access) *[]string
	}{
		{"allow", func(a *Access) *[]string { return &a.Allow }},
		{"allow-name", func(a *Access) *[]string { return &a.AllowNames }},
	} {
		f, ok := changed(a.flag)
		if !ok {
			continue
		}
		list, err := flagStrings(f)
		if err != nil {
			errs = append(errs, fmt.Errorf("--%s: %w", a.flag, err))
			continue
		}
		*a.ref(&c.VolumeExports) = clone(list)
		for i := range c.Exports {
			*a.ref(&c.Exports[i].Access) = clone(list)
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if err := c.Validate(); err != nil {
		return fmt.Errorf("the configuration with the command-line flags:\n%w", err)
	}
	return nil
}

// flagStrings reads a repeatable flag (StringArray or StringSlice).
func flagStrings(f *pflag.Flag) ([]string, error) {
	sv, ok := f.Value.(pflag.SliceValue)
	if !ok {
		return nil, fmt.Errorf("is a %s flag, not a list", f.Value.Type())
	}
	return sv.GetSlice(), nil
}
