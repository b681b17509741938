// Command promcheck checks Prometheus alerting rules and PromQL expressions with Prometheus's
// own parser, so the chart's tests judge them as Prometheus will.
//
// Input (stdin, JSON): {"rules": "<a rule file, as YAML>", "expressions": ["<PromQL>", ...]}.
// Output (stdout, JSON): {"errors": ["..."], "selectors": {"<expression>": [{"metric": "<name>",
// "labels": ["<label matched on>", ...]}, ...]}}: what every expression (each rule's and each
// given one) selects. The exit status is 0 even when errors are found: the caller reads them.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sort"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
)

type input struct {
	Rules       string   `json:"rules"`
	Expressions []string `json:"expressions"`
}

type selector struct {
	Metric string   `json:"metric"`
	Labels []string `json:"labels"`
}

type output struct {
	Errors    []string              `json:"errors"`
	Selectors map[string][]selector `json:"selectors"`
}

func main() {
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail(err)
	}
	var in input
	if err := json.Unmarshal(raw, &in); err != nil {
		fail(fmt.Errorf("input is not JSON: %w", err))
	}
	p := parser.NewParser(parser.Options{})
	out := output{Errors: []string{}, Selectors: map[string][]selector{}}
	expressions := append([]string{}, in.Expressions...)
	if in.Rules != "" {
		logger := slog.New(slog.NewTextHandler(io.Discard, nil))
		groups, errs := rulefmt.Parse([]byte(in.Rules), false, model.UTF8Validation, p, logger)
		for _, e := range errs {
			out.Errors = append(out.Errors, "rules: "+e.Error())
		}
		if groups != nil {
			for _, group := range groups.Groups {
				for _, rule := range group.Rules {
					expressions = append(expressions, rule.Expr)
				}
			}
		}
	}
	for _, expression := range expressions {
		expr, err := p.ParseExpr(expression)
		if err != nil {
			out.Errors = append(out.Errors, fmt.Sprintf("expression %q: %v", expression, err))
			continue
		}
		out.Selectors[expression] = selectors(expr)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail(err)
	}
}

func selectors(expr parser.Expr) []selector {
	found := []selector{}
	parser.Inspect(expr, func(node parser.Node, _ []parser.Node) error {
		vector, ok := node.(*parser.VectorSelector)
		if !ok || vector.Name == "" {
			return nil
		}
		labels := []string{}
		for _, matcher := range vector.LabelMatchers {
			if matcher.Name != model.MetricNameLabel {
				labels = append(labels, matcher.Name)
			}
		}
		sort.Strings(labels)
		found = append(found, selector{Metric: vector.Name, Labels: labels})
		return nil
	})
	return found
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "promcheck:", err)
	os.Exit(2)
}
