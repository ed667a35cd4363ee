package main

import (
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// applyConfig fills every flag of cmd that was not set on the command line:
// first from the environment (KILN_<COMMAND>__<FLAG>, then KILN_<FLAG>),
// then from the TOML file named by --config or KILN_CONFIG (table
// [<command>], nested tables joined with '-'). Flags win over the
// environment, which wins over the file, which wins over the defaults.
func applyConfig(cmd *cobra.Command, lookupEnv func(string) (string, bool)) error {
	flags := cmd.Flags()
	section := cmd.Name()
	fileVals, fileName, err := loadConfigFile(cmd, lookupEnv)
	if err != nil {
		return err
	}
	var errs []string
	flags.VisitAll(func(f *pflag.Flag) {
		if f.Changed || f.Name == "config" || f.Name == "help" {
			return
		}
		for _, env := range envNames(section, f.Name) {
			if v, ok := lookupEnv(env); ok {
				if err := flags.Set(f.Name, v); err != nil {
					errs = append(errs, fmt.Sprintf("environment %s=%q: %v", env, v, err))
				}
				return
			}
		}
		if v, ok := fileVals[f.Name]; ok {
			if err := setFromFile(flags, f, v); err != nil {
				errs = append(errs, fmt.Sprintf("%s: key %s: %v", fileName, f.Name, err))
			}
		}
	})
	for key := range fileVals {
		if flags.Lookup(key) == nil || key == "config" {
			errs = append(errs, fmt.Sprintf("%s: unknown key %q in [%s]", fileName, key, section))
		}
	}
	if len(errs) > 0 {
		sort.Strings(errs)
		return fmt.Errorf("configuration: %s", strings.Join(errs, "; "))
	}
	return nil
}

func envNames(section, flag string) []string {
	key := strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
	sec := strings.ToUpper(strings.ReplaceAll(section, "-", "_"))
	return []string{"KILN_" + sec + "__" + key, "KILN_" + key}
}

// loadConfigFile reads the command's table of the TOML file, flattened to
// flag names. Top-level scalar keys apply to every command.
func loadConfigFile(cmd *cobra.Command, lookupEnv func(string) (string, bool)) (map[string]any, string, error) {
	name := ""
	if f := cmd.Flags().Lookup("config"); f != nil {
		name = f.Value.String()
		if name == "" {
			if v, ok := lookupEnv("KILN_CONFIG"); ok {
				name = v
			}
		}
	}
	if name == "" {
		return nil, "", nil
	}
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, name, fmt.Errorf("config file: %w", err)
	}
	var doc map[string]any
	if err := toml.Unmarshal(b, &doc); err != nil {
		return nil, name, fmt.Errorf("config file %s: %w", name, err)
	}
	out := map[string]any{}
	for k, v := range doc {
		if _, isTable := v.(map[string]any); !isTable {
			out[normKey(k)] = v
		}
	}
	if t, ok := doc[cmd.Name()].(map[string]any); ok {
		flatten("", t, out)
	}
	return out, name, nil
}

func normKey(k string) string { return strings.ReplaceAll(k, "_", "-") }

func flatten(prefix string, t map[string]any, out map[string]any) {
	for k, v := range t {
		key := normKey(k)
		if prefix != "" {
			key = prefix + "-" + key
		}
		if sub, ok := v.(map[string]any); ok {
			flatten(key, sub, out)
			continue
		}
		out[key] = v
	}
}

func setFromFile(flags *pflag.FlagSet, f *pflag.Flag, v any) error {
	var s string
	switch x := v.(type) {
	case []any:
		parts := make([]string, len(x))
		for i, e := range x {
			parts[i] = fmt.Sprint(e)
		}
		s = strings.Join(parts, ",")
	case time.Time:
		s = x.Format(time.RFC3339)
	default:
		s = fmt.Sprint(x)
	}
	return flags.Set(f.Name, s)
}
