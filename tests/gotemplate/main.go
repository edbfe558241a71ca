// Renders an Ollama Modelfile TEMPLATE with Go's own text/template, the way Ollama does
// (ollama/template/template.go: system messages stay in .Messages and their text is also
// joined into .System; consecutive messages of one role are merged), for tests/test_families.py.
//
// stdin: {"template": "...", "messages": [{"role": "...", "content": "..."}, ...]}
// stdout: the rendered prompt.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		msg := msgs[i]
		if msg.Role == "system" {
			system = append(system, msg.Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msg.Role {
			collated[len(collated)-1].Content += "\n\n" + msg.Content
		} else {
			collated = append(collated, &msg)
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("").Option("missingkey=zero").Parse(in.Template))
	system, messages := collate(in.Messages)
	data := map[string]any{"System": system, "Messages": messages, "Tools": nil, "Response": "", "Prompt": ""}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
