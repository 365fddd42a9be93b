-- Typst output: draw Quarto callouts (Divs with class callout-*) as shaded boxes.
local colors = {
  ["callout-note"] = "rgb(\"#1f5f99\")", ["callout-tip"] = "rgb(\"#2e8540\")",
  ["callout-warning"] = "rgb(\"#d97706\")", ["callout-caution"] = "rgb(\"#d97706\")",
  ["callout-important"] = "rgb(\"#c0392b\")",
}

function Div(el)
  for _, class in ipairs(el.classes) do
    local color = colors[class]
    if color then
      local blocks = { pandoc.RawBlock("typst", "#block(width: 100%, inset: 8pt, radius: 3pt, "
        .. "stroke: (left: 3pt + " .. color .. "), fill: " .. color .. ".lighten(92%))[") }
      for _, b in ipairs(el.content) do table.insert(blocks, b) end
      table.insert(blocks, pandoc.RawBlock("typst", "]"))
      return blocks
    end
  end
end

function Span(el)
  if el.classes:includes("callout-title") then
    return pandoc.Strong(el.content)
  end
end
